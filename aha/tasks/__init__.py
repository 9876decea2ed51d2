"""Tasks: each owns its problems (a training stream and a held-out evaluation set), its prompt,
its answer extraction and its reward components. `get_task(name)` picks one by name."""

from aha.errors import AhaError
from aha.tasks.base import Problem, Task


def get_task(name: str, **options) -> Task:
    if name == "addition":
        from aha.tasks.addition import AdditionTask
        return AdditionTask(**options)
    raise AhaError(f"unknown task {name!r}: choose one of: addition")


__all__ = ["Problem", "Task", "get_task"]
