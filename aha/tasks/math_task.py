"""MATH-style problems graded by `math-verify` (`pip install math-verify`).

Rows have `problem` and `solution`; the gold is the last `\\boxed{…}` of the solution. The model's
`<answer>` is parsed by math-verify (wrapped in `$…$` unless it already holds `$` or `\\boxed`)
and compared with `verify(gold, predicted)`, gold first: `0.5`, `1/2` and `\\frac12` all match
`\\frac{1}{2}`. The answer must be one line: math-verify grades the last line of several, so a list of
candidates, one a line, would earn credit.

Grading runs in a small pool of worker processes kept alive between calls: math-verify's own
timeouts use signals, which work only in a main thread, and a hostile answer (`9^{9^{9}}`) can
keep SymPy busy past them. A grade that takes longer than `timeout` seconds scores 0 and the
pool is replaced. Grades are cached: a group of G samples often repeats one answer.

    get_task("math", data="math_train.parquet")
"""

import atexit
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool

from aha.infra.errors import AhaError
from aha.tasks.base import Problem, extract_answer, is_well_formed
from aha.tasks.data import BadRow, RowTask, require

MAX_ANSWER_CHARS = 1000
CACHE_SIZE = 10_000


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{…}` (or `\\fbox{…}`), braces balanced; None if none.

    >>> last_boxed(r"so \\boxed{1} or rather \\boxed{\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    >>> last_boxed(r"\\boxed{unclosed") is None
    True
    """
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def _warm_up() -> None:
    import math_verify  # noqa: F401  the import takes a second; pay it once per worker


def _verify(gold: str, predicted: str, inner_timeout: int) -> bool:
    """Runs in a worker's main thread, where math-verify's signal timeouts work."""
    from math_verify import parse, verify
    gold_parsed = parse(f"$\\boxed{{{gold}}}$", parsing_timeout=inner_timeout)
    text = predicted if ("$" in predicted or "\\boxed" in predicted) else f"${predicted}$"
    predicted_parsed = parse(text, parsing_timeout=inner_timeout)
    return bool(verify(gold_parsed, predicted_parsed, timeout_seconds=inner_timeout))


class MathGrader:
    """`verify(gold, predicted)` in worker processes, with a per-answer timeout and a cache."""

    def __init__(self, workers: int = 2, timeout: float = 5.0):
        self.workers, self.timeout = workers, timeout
        self.inner_timeout = max(1, int(timeout / 2))
        self.pool: ProcessPoolExecutor | None = None
        self.cache: dict[tuple[str, str], bool] = {}
        self.timeouts = 0
        atexit.register(self.close)

    def _start(self) -> ProcessPoolExecutor:
        # fork on Linux, as torch's DataLoader does: spawn and forkserver re-run the caller's
        # main script in each worker, which breaks any script without `if __name__ == "__main__"`.
        # The forked worker runs no torch, and its only thread is its main thread.
        method = "fork" if sys.platform == "linux" else "spawn"
        pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(method))
        for future in [pool.submit(_warm_up) for _ in range(self.workers)]:
            future.result()
        return pool

    def close(self) -> None:
        if self.pool is not None:
            # a timed-out worker never returns: kill it (the executor has no public way to)
            for process in list((getattr(self.pool, "_processes", None) or {}).values()):
                process.kill()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    def verify(self, gold: str, predicted: str) -> bool:
        key = (gold, predicted)
        if key in self.cache:
            return self.cache[key]
        if self.pool is None:
            self.pool = self._start()
        try:
            result = self.pool.submit(_verify, gold, predicted, self.inner_timeout).result(timeout=self.timeout)
        except FutureTimeout:
            self.timeouts += 1
            self.close()
            result = False
        except BrokenProcessPool:     # a worker died (out of memory, killed): start afresh
            self.close()
            result = False
        except Exception:             # SymPy or parsing errors inside the worker
            result = False
        if len(self.cache) >= CACHE_SIZE:
            self.cache.clear()
        self.cache[key] = result
        return result


class MathTask(RowTask):
    name = "math"

    def __init__(self, workers: int = 2, timeout: float = 5.0, **options):
        try:
            import math_verify  # noqa: F401  fail now, with a clear message, not in a worker
        except ImportError as exc:
            raise AhaError("the math task needs math-verify: pip install math-verify") from exc
        super().__init__(**options)
        self.grader = MathGrader(workers, timeout)

    def parse_row(self, row: dict) -> Problem:
        question, solution = require(row, "problem"), require(row, "solution")
        gold = last_boxed(solution)
        if not gold:
            raise BadRow("the solution has no \\boxed{} answer")
        return Problem(question=question, answer=gold, meta={"solution": solution})

    def score(self, completion: str, problem: Problem) -> dict[str, float]:
        answer = extract_answer(completion)
        # one line: math-verify reads "0\n\\frac{1}{2}" as its last line, so listing candidates would pay
        correct = (bool(answer) and len(answer) <= MAX_ANSWER_CHARS and "\n" not in answer
                   and self.grader.verify(problem.answer, answer))
        return {"accuracy": float(correct), "format": float(is_well_formed(completion))}
