"""Sampling metrics over k answers per problem: pass@k, cons@k (majority vote), reflection rate.

Pure functions of counts and strings, used by `aha eval` (aha/eval/evaluate.py).

- `passed(accuracy)`: a sample is correct at full accuracy; pass@1, pass@k and cons@k all use it.
- pass@k is the unbiased estimator of Chen et al. 2021 (Codex): from n ≥ k samples of which c
  are correct, 1 − C(n−c, k) / C(n, k), computed as the product 1 − Π_{i=n−c+1..n} (1 − k/i),
  which never forms the huge binomials.
- cons@k is R1's majority vote: the most frequent extracted answer of k samples is the model's
  answer. Samples with no answer do not vote; ties go to the answer seen first, so the result
  does not depend on hash order.
- reflection rate: the share of completions that use a "reflection" word (wait, check, verify …),
  the surface sign of R1-Zero's "aha moment". Words match whole, case-insensitive.
"""

import re
from collections import Counter
from collections.abc import Iterable, Sequence

REFLECTION_WORDS = ("wait", "check", "verify", "recheck", "re-check", "double-check", "mistake", "hmm")


def passed(accuracy: float) -> bool:
    """The one definition of "correct" that pass@1, pass@k and cons@k share: full accuracy.
    Partial credit (code's share of tests, some reasoning-gym scores) is not a pass, and a `py:`
    reward above 1 is one pass, not more.

    >>> passed(1.0), passed(0.5), passed(3.0)
    (True, False, True)
    """
    return accuracy >= 1.0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct.

    >>> pass_at_k(4, 1, 2), pass_at_k(4, 0, 2), pass_at_k(4, 4, 2), pass_at_k(4, 1, 1)
    (0.5, 0.0, 1.0, 0.25)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 ≤ c ≤ n and 1 ≤ k ≤ n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(correct_per_problem: Sequence[Sequence[float]], k: int) -> float:
    """Mean pass@k over problems; each item lists the correctness of that problem's samples
    (a sample counts as correct at 1.0: partial credit is not a pass)."""
    values = [pass_at_k(len(row), sum(map(passed, row)), k) for row in correct_per_problem]
    return sum(values) / len(values) if values else 0.0


def majority_answer(answers: Iterable[str | None]) -> str | None:
    """The most frequent non-None answer; ties go to the one seen first.

    >>> majority_answer(["3", "4", "4", None, "3"]), majority_answer([None, None])
    ('3', None)
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in counts if counts[a] == best)     # Counter keeps first-seen order


def cons_at_k(answers: Sequence[str | None], correct: Sequence[float], k: int) -> float:
    """1.0 when the majority answer of the first k samples is a correct one.

    `correct[i]` is the correctness of sample i, so the task's own checker decides whether the
    voted answer is right (no second notion of equality here).

    >>> cons_at_k(["5", "4", "4"], [1.0, 0.0, 0.0], 3), cons_at_k(["5", "4", "5"], [1.0, 0.0, 1.0], 3)
    (0.0, 1.0)
    """
    if not 1 <= k <= len(answers):
        raise ValueError(f"cons@k needs 1 ≤ k ≤ {len(answers)} samples, got k={k}")
    winner = majority_answer(answers[:k])
    if winner is None:
        return 0.0
    return float(any(passed(ok) for a, ok in zip(answers[:k], correct[:k]) if a == winner))


def reflection_pattern(words: Sequence[str] = REFLECTION_WORDS) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def reflection_rate(completions: Sequence[str], words: Sequence[str] = REFLECTION_WORDS) -> float:
    """Share of completions with at least one reflection word.

    >>> reflection_rate(["Wait, 3+4=7", "7", "let me verify: ok", "checking"])
    0.5
    """
    if not completions:
        return 0.0
    pattern = reflection_pattern(words)
    return sum(bool(pattern.search(text)) for text in completions) / len(completions)
