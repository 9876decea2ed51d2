"""`code`: the model writes a Python function; the reward is the share of hidden tests it passes.

    get_task("code")                           # ~60 generated function-writing problems, 10% held out
    get_task("code", data="problems.jsonl")    # rows: prompt, tests (list of assert strings), entry_point?

The code is the one `<answer>…</answer>`, unwrapped when it holds a ``` fence; with no answer tag,
the last fenced block of the completion. It runs against the row's tests in `aha.tasks.sandbox` (a
throwaway jailed subprocess per completion, each test in its own process; docs/sandbox.md) with
short limits, 3 s wall and 2 s CPU. Components: `accuracy` = tests passed / tests, `format` = the
R1-Zero answer format. A completion with no code, code that does not parse, or code that never
names the row's `entry_point` scores 0 without starting a sandbox.

`score_batch(completions, problems)` grades a whole batch in a thread pool: the work happens in
the sandbox's subprocesses, so threads overlap it, and a group's identical completions run once.

Departures: the tests are hidden (the prompt is the statement only); the reward is partial
credit, where code-R1 recipes often give 1 only when every test passes.
"""

import ast
import random
import re
import textwrap
from concurrent.futures import ThreadPoolExecutor

from aha.infra.errors import AhaError
from aha.tasks.base import ANSWER_RE, Problem, extract_answer, is_well_formed
from aha.tasks.data import BadRow, RowTask, require, split_heldout
from aha.tasks.sandbox import run_tests

FENCE_RE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)
MAX_CODE_CHARS = 20_000
BUILTIN_SEED = 4242


def extract_code(completion: str) -> str | None:
    """The code of the one `<answer>` (its last fence, if it has one), else of the last fence; None
    when the completion holds several answers or a stray answer tag.

    >>> extract_code("<think>hm</think> <answer>def f(x):\\n    return x</answer>")
    'def f(x):\\n    return x'
    >>> extract_code("<answer>```python\\ndef f(): pass\\n```</answer>"), extract_code("def f(): pass")
    ('def f(): pass', None)
    """
    text = None
    if "<answer>" in completion or "</answer>" in completion:
        if extract_answer(completion) is None:     # several answers or a broken tag: no code
            return None
        text = ANSWER_RE.search(completion).group(1)
    fences = FENCE_RE.findall(completion if text is None else text)
    if fences:
        text = fences[-1]
    elif text is None:
        return None
    code = textwrap.dedent(text.strip("\n")).strip()
    return code or None


def parses(code: str) -> bool:
    """Does `code` parse? A cheap check in the trainer that spares a sandbox for broken code
    (deep nesting raises RecursionError/MemoryError here rather than crashing)."""
    try:
        compile(code, "<solution>", "exec", flags=ast.PyCF_ONLY_AST)
        return True
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False


# ---- the built-in problems: templates with parameters, tests computed from a reference -------

def _templates(rng: random.Random):
    """(statement, call name, reference function, test inputs) for each generated problem."""
    lists = [[], [3], [1, 5, 2, 8], [-4, 7, 0, 7, 10], [12, -3, 6]]
    words = ["", "banana", "Level", "hello world", "abracadabra"]
    for a, b in dict.fromkeys((rng.randint(2, 9), rng.randint(1, 9)) for _ in range(8)):
        yield (f"Write a Python function `f(x)` that returns x * {a} + {b}.", "f",
               lambda x, a=a, b=b: x * a + b, [0, 1, -2, 5])
    for k in rng.sample(range(0, 10), 6):
        yield (f"Write a Python function `sum_greater(xs)` that returns the sum of the elements of the list "
               f"xs that are greater than {k}.", "sum_greater", lambda xs, k=k: sum(x for x in xs if x > k), lists[1:])
    for c in rng.sample("abehlnor", 5):
        yield (f"Write a Python function `count_char(s)` that returns how many times the character {c!r} "
               f"appears in the string s.", "count_char", lambda s, c=c: s.count(c), words[1:])
    for k in rng.sample(range(2, 10), 5):
        yield (f"Write a Python function `scale(xs)` that returns a new list with every element of the list xs "
               f"multiplied by {k}.", "scale", lambda xs, k=k: [x * k for x in xs], lists[:4])
    for lo in rng.sample(range(-5, 5), 5):
        hi = lo + rng.randint(2, 8)
        yield (f"Write a Python function `clamp(x)` that returns x limited to the range {lo} to {hi}: "
               f"{lo} when x is smaller, {hi} when x is larger, else x.", "clamp",
               lambda x, lo=lo, hi=hi: min(max(x, lo), hi), [lo - 3, lo, hi + 1, (lo + hi) // 2])
    for k in rng.sample(range(2, 8), 5):
        yield (f"Write a Python function `sum_multiples(n)` that returns the sum of all positive multiples of "
               f"{k} that are below n.", "sum_multiples", lambda n, k=k: sum(range(k, n, k)), [0, k, 20, 37])
    for k in rng.sample(range(2, 12), 5):
        yield (f"Write a Python function `divisible(x)` that returns True when the integer x is divisible by "
               f"{k}, else False.", "divisible", lambda x, k=k: x % k == 0, [0, k, k + 1, 7 * k])
    for k in rng.sample(range(2, 6), 4):
        yield (f"Write a Python function `repeat(s)` that returns the string s repeated {k} times, "
               f"joined by '-'.", "repeat", lambda s, k=k: "-".join([s] * k), ["", "ab", "x", "hi there"])
    for p in (2, 3, 4):
        yield (f"Write a Python function `powers(n)` that returns the list [i ** {p} for i from 0 to n - 1].",
               "powers", lambda n, p=p: [i ** p for i in range(n)], [0, 1, 4, 6])
    for c in rng.sample("aeilnrs", 5):
        yield (f"Write a Python function `remove_char(s)` that returns the string s with every {c!r} removed.",
               "remove_char", lambda s, c=c: s.replace(c, ""), words[1:])
    yield ("Write a Python function `reverse(s)` that returns the string s reversed.", "reverse",
           lambda s: s[::-1], words[1:])
    yield ("Write a Python function `is_palindrome(s)` that returns True when the string s reads the same "
           "backwards, else False.", "is_palindrome", lambda s: s == s[::-1], ["", "abba", "Level", "abc"])
    yield ("Write a Python function `count_vowels(s)` that returns the number of lowercase vowels (a, e, i, "
           "o, u) in the string s.", "count_vowels", lambda s: sum(ch in "aeiou" for ch in s), words[1:])


def builtin_problems() -> list[Problem]:
    """The generated set, the same in every process: parameters come from a fixed seed."""
    problems = []
    for statement, name, reference, inputs in _templates(random.Random(BUILTIN_SEED)):
        tests = [f"assert {name}({value!r}) == {reference(value)!r}" for value in inputs]
        problems.append(
            Problem(question=statement, answer="\n".join(tests), meta={"tests": tests, "entry_point": name})
        )
    return problems


class CodeTask(RowTask):
    name = "code"

    def __init__(self, data=None, eval_data=None, eval_fraction: float = 0.1, skip_bad_rows: bool = False,
                 timeout: float = 3.0, cpu: int = 2, workers: int = 4):
        self.limits = {"timeout_s": timeout, "cpu_s": cpu}
        self.workers = workers
        if data is not None:
            super().__init__(data=data, eval_data=eval_data, eval_fraction=eval_fraction, skip_bad_rows=skip_bad_rows)
            return
        if eval_data is not None:
            raise AhaError("code: eval_data=PATH needs data=PATH too (the built-in problems have their own split)")
        if not 0.0 < eval_fraction < 1.0:
            raise AhaError(f"code: eval_fraction={eval_fraction} must be in (0, 1) for the built-in problems")
        self.skip_bad_rows, self.skipped_rows = skip_bad_rows, 0
        self.train, self.heldout = split_heldout(builtin_problems(), eval_fraction)

    def parse_row(self, row: dict) -> Problem:
        question, tests = require(row, "prompt"), row.get("tests")
        if not isinstance(tests, (list, tuple)) or not tests:
            raise BadRow(f"'tests' must be a non-empty list of assert strings, got {type(tests).__name__}")
        for index, test in enumerate(tests):
            if not isinstance(test, str) or not test.strip() or not parses(test):
                raise BadRow(f"test {index + 1} is not a Python statement: {str(test)[:40]!r}")
        entry_point = row.get("entry_point") or None
        if entry_point is not None and not (isinstance(entry_point, str) and entry_point.isidentifier()):
            raise BadRow(f"'entry_point' must be a function name, got {entry_point!r:.40}")
        return Problem(
            question=question, answer="\n".join(tests), meta={"tests": list(tests), "entry_point": entry_point}
        )

    def program(self, code: str, problem: Problem) -> str:
        """The program the tests run after: the answer's code itself (humaneval puts the problem's prompt first)."""
        return code

    def runnable(self, code: str | None, problem: Problem) -> bool:
        """Worth a sandbox: code that parses and names the entry point (when the row gives one)."""
        entry_point = problem.meta.get("entry_point")
        return (code is not None and len(code) <= MAX_CODE_CHARS and parses(code)
                and (entry_point is None or re.search(rf"\b{entry_point}\b", code) is not None))

    def grade(self, job: tuple[str, tuple[str, ...]]) -> float:
        code, tests = job
        try:
            return run_tests(code, list(tests), **self.limits)
        except RuntimeError as exc:   # the sandbox cannot start on this machine: not the model's fault
            raise AhaError(f"code task: {str(exc).splitlines()[0]} (see docs/sandbox.md)") from None

    def score_batch(self, completions: list[str], problems: list[Problem]) -> list[dict[str, float]]:
        """Scores of completions[i] on problems[i], the sandbox runs spread over `workers` threads."""
        jobs = [(self.program(code, p), tuple(p.meta["tests"])) if self.runnable(code, p) else None
                for code, p in zip(map(extract_code, completions), problems)]
        unique = list(dict.fromkeys(job for job in jobs if job is not None))   # identical samples run once
        passed = {}
        if unique:
            with ThreadPoolExecutor(min(self.workers, len(unique))) as pool:
                passed = dict(zip(unique, pool.map(self.grade, unique)))
        return [{"accuracy": passed.get(job, 0.0), "format": float(is_well_formed(text))}
                for job, text in zip(jobs, completions)]

    def score(self, completion: str, problem: Problem) -> dict[str, float]:
        return self.score_batch([completion], [problem])[0]
