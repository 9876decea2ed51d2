"""`py:module:function`: your own reward function, with TRL's signature, on your own data file.

    def my_reward(prompts: list[str], completions: list[str], **columns) -> list[float | None]: ...

    get_task("py:my_rewards:my_reward", data="problems.jsonl")   # rows with `prompt` and `answer`

Each call gets one completion: `prompts=[row["prompt"]]`, `completions=[text]`, and every other
column of the row as a one-item list (`answer=[...]`, …), as TRL passes dataset columns. The
returned number is the `accuracy` component. `None` means "skip this sample" (TRL: the function
does not apply): the score then has `skip` = 1.0 and accuracy 0.0, so a trainer that does not
look at `skip` treats it as TRL's nansum does. A wrong length, a non-number, NaN/inf, or an
exception raises `AhaError` naming the function.
"""

import importlib
import math
import sys
from pathlib import Path

from aha.infra.errors import AhaError
from aha.tasks.base import Problem, is_well_formed
from aha.tasks.data import RowTask, require


def load_function(spec: str):
    """`module:function` (a dotted module importable from the working directory) → the callable."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise AhaError(f"py:{spec}: write the reward as py:module:function")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise AhaError(f"py:{spec}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}") from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise AhaError(f"py:{spec}: module {module_name!r} has no function {function_name!r}")
    return function


class CustomRewardTask(RowTask):
    components = ("accuracy", "format", "skip")     # what `score` returns (not found by calling your function)

    def __init__(self, spec: str, **options):
        self.name, self.spec = f"py:{spec}", spec
        self.function = load_function(spec)
        super().__init__(**options)

    def parse_row(self, row: dict) -> Problem:
        return Problem(question=require(row, "prompt"), answer=require(row, "answer"), meta=row)

    def reward(self, completion: str, problem: Problem) -> float | None:
        columns = {k: [v] for k, v in problem.meta.items() if k not in ("prompt", "prompts", "completions")}
        try:
            values = self.function(prompts=[problem.question], completions=[completion], **columns)
        except Exception as exc:
            message = str(exc).splitlines()[0] if str(exc) else ""
            raise AhaError(f"reward function {self.spec} raised {type(exc).__name__}: {message}") from exc
        try:
            values = list(values)
        except TypeError:
            raise AhaError(
                f"reward function {self.spec} returned {type(values).__name__}, not a list of floats"
            ) from None
        if len(values) != 1:
            raise AhaError(
                f"reward function {self.spec} returned {len(values)} values for 1 completion; return one per completion"
            )
        value = values[0]
        if value is None:
            return None
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError
            value = float(value)          # int, bool, numpy and 0-d torch numbers too
        except (TypeError, ValueError):
            raise AhaError(f"reward function {self.spec} returned {value!r:.40}; return a float or None") from None
        if not math.isfinite(value):
            raise AhaError(
                f"reward function {self.spec} returned {value} for a completion; return a finite float or None"
            )
        return value

    def score(self, completion: str, problem: Problem) -> dict[str, float]:
        value = self.reward(completion, problem)
        return {"accuracy": 0.0 if value is None else value, "format": float(is_well_formed(completion)),
                "skip": float(value is None)}
