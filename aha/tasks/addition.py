"""The built-in task: add two n-digit numbers (default 3 digits), checked exactly.

The answer can be produced two ways, and the pretraining corpus (see `corpus_document`) shows both:
- worked: `<think>` a digit-by-digit sum from the right, carries written out `</think>`, answer;
- direct: an answer at once, written the way a hurried writer does, with the carries dropped
  (`4821+3977` → `7798`), so it is right only when no column carries (~13% of 3-digit sums).
So answering without reasoning stays wrong however long the base model trains, reasoning is
right, and the base model reasons only as often as its corpus did. RL has to discover that
reasoning pays: accuracy and response length rise together, as in R1-Zero.

Held-out split: an unordered pair {a, b} is held out when a fixed hash of it is 0 mod 10. The
evaluation set comes only from held-out pairs; the training stream and the pretraining corpus
never contain one (checked in tests/test_task.py).
"""

import functools
import random
import re
from collections.abc import Iterator

from aha.infra.errors import AhaError
from aha.tasks.base import Problem, Task, extract_answer, is_well_formed

HELDOUT_MOD = 10
EVAL_SEED = 1234
ASCII_NUMBER_RE = re.compile(r"[0-9]{1,39}")


def is_heldout(a: int, b: int) -> bool:
    lo, hi = min(a, b), max(a, b)
    return (lo * 1_000_003 + hi) * 2_654_435_761 % 4_294_967_291 % HELDOUT_MOD == 0


@functools.cache
def count_heldout_pairs(low: int, high: int) -> int:
    """Ordered held-out pairs with both numbers in low..high: counted once per process (0.5 s at
    3 digits, and every evaluation asks)."""
    span = range(low, high + 1)
    return sum(is_heldout(a, b) for a in span for b in span)


def worked_solution(a: int, b: int) -> str:
    """`<think>1+7+0=08, 2+7+0=09, 8+9+0=17, 4+3+1=08</think>` for 4821+3977.

    Right to left, the carry always written, every sum two digits: each step has the same
    width, so the digit a step needs sits at a fixed distance back — easy to find for a tiny
    model with relative (RoPE) positions.
    """
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s:02d}")
        carry = s // 10
    return "<think>" + ", ".join(steps) + "</think>"


def sloppy_sum(a: int, b: int) -> str:
    """Column sums with the carries dropped, one digit per column: the corpus's direct answers."""
    da, db = str(a)[::-1], str(b)[::-1]
    n = max(len(da), len(db))
    cols = [((int(da[i]) if i < len(da) else 0) + (int(db[i]) if i < len(db) else 0)) % 10 for i in range(n)]
    return "".join(str(c) for c in reversed(cols))


class AdditionTask(Task):
    name = "addition"
    writes_corpus = True

    def __init__(self, digits: int = 3):
        if not 1 <= digits <= 12:
            raise AhaError(f"addition: digits={digits} is out of range; use 1..12")
        self.digits = digits
        self.low, self.high = 10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1

    def _pair(self, rng: random.Random) -> tuple[int, int]:
        return rng.randint(self.low, self.high), rng.randint(self.low, self.high)

    def _problem(self, a: int, b: int) -> Problem:
        return Problem(question=f"{a}+{b}", answer=str(a + b), meta={"a": a, "b": b})

    def train_problems(self, seed: int) -> Iterator[Problem]:
        rng = random.Random(seed)
        while True:
            a, b = self._pair(rng)
            if not is_heldout(a, b):
                yield self._problem(a, b)

    def heldout_pairs(self) -> int | None:
        """How many ordered held-out pairs there are, where few enough to count (≤ 3 digits); None above."""
        return count_heldout_pairs(self.low, self.high) if self.digits <= 3 else None

    def eval_problems(self, n: int) -> list[Problem]:
        available = self.heldout_pairs()
        if available is not None and n > available:      # else the search below never ends
            raise AhaError(f"addition with digits={self.digits} has only {available} held-out problems, "
                           f"fewer than the {n} asked for: ask for at most {available} (eval_problems / --problems) "
                           f"or use more digits")
        rng, seen, out = random.Random(EVAL_SEED), set(), []
        while len(out) < n:
            a, b = self._pair(rng)
            if is_heldout(a, b) and (a, b) not in seen:
                seen.add((a, b))
                out.append(self._problem(a, b))
        return out

    def prompt(self, problem: Problem) -> str:
        # The one-line R1-Zero template; the system sentence is left out for the tiny model.
        return f"User: {problem.question}\nAssistant:"

    def corpus_document(self, problem: Problem, think: bool, padding: int = 0) -> str:
        """One pretraining document: the prompt and a worked or a direct (sloppy) response.
        `padding` spaces after the answer's digits change neither its score nor its format:
        they make length free of correctness (`aha experiment length-bias`)."""
        a, b = problem.meta["a"], problem.meta["b"]
        pad = " " * padding
        if think:
            response = f" {worked_solution(a, b)} <answer>{a + b}{pad}</answer>"
        else:
            response = f" <answer>{sloppy_sum(a, b)}{pad}</answer>"
        return self.prompt(problem) + response

    def score(self, completion: str, problem: Problem) -> dict[str, float]:
        answer = extract_answer(completion)
        # ASCII digits only: str.isdigit() also takes '²', which int() refuses, and int() takes '١٢٣'
        correct = (
            answer is not None and ASCII_NUMBER_RE.fullmatch(answer) is not None and int(answer) == int(problem.answer)
        )
        return {"accuracy": float(correct), "format": float(is_well_formed(completion))}
