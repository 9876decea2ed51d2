"""What every task provides, and the R1-Zero answer format shared by the built-in tasks.

The reward starts as the evaluation metric (`accuracy`); shaping terms are named components
that the trainer weights and logs one by one.
"""

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from aha.infra.errors import AhaError

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
THINK_RE = re.compile(r"^\s*<think>(.*?)</think>", re.DOTALL)


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    meta: dict = field(default_factory=dict, compare=False)


class Task:
    """What every task provides. A task defines `name` and the four required methods; the optional
    hooks below have defaults, which a task overrides when it needs to (the loop calls them all
    unconditionally, never looking them up)."""

    name: str
    components: tuple[str, ...] = ()    # the names `score` returns, when scoring "" would not show them all
    adds_special_tokens: bool = True    # False: the prompt text writes its own BOS (a chat template)
    skipped_rows: int = 0               # rows of the data file skipped as bad (skip_bad_rows=True)
    writes_corpus: bool = False         # True: `corpus_document` writes worked solutions (pretrain, cold start)

    # -- required
    def train_problems(self, seed: int) -> Iterator[Problem]:
        """An endless stream of training problems, in an order drawn from `seed`."""
        raise NotImplementedError

    def eval_problems(self, n: int) -> list[Problem]:
        """The first `n` held-out problems (never among the training ones)."""
        raise NotImplementedError

    def prompt(self, problem: Problem) -> str:
        raise NotImplementedError

    def score(self, completion: str, problem: Problem) -> dict[str, float]:
        """Reward components by name; `accuracy` (1 = a full pass) is always one of them."""
        raise NotImplementedError

    # -- optional hooks
    def score_batch(self, completions: list[str], problems: list[Problem]) -> list[dict[str, float]]:
        """`score` of completions[i] on problems[i]; a task that grades in parallel (code) overrides it."""
        return [self.score(c, p) for c, p in zip(completions, problems)]

    def corpus_document(self, problem: Problem, think: bool) -> str:
        """A pretraining document: the prompt and a worked answer (with reasoning when `think`)."""
        raise AhaError(f"task {self.name!r} writes no worked solutions (writes_corpus is False)")


def extract_answer(completion: str) -> str | None:
    """The text of the completion's one `<answer>…</answer>` (newlines inside allowed), stripped;
    None when there is none, or more than one `<answer>` or `</answer>` tag (several answers,
    nested or repeated tags earn nothing: otherwise a model could hedge with one of each).

    >>> extract_answer("<think>2+2</think> <answer>\\n4\\n</answer>")
    '4'
    >>> extract_answer("<answer>3</answer><answer>4</answer>") is None
    True
    """
    if completion.count("<answer>") != 1 or completion.count("</answer>") != 1:
        return None
    found = ANSWER_RE.search(completion)
    return found.group(1).strip() if found else None


def is_well_formed(completion: str) -> bool:
    """An optional `<think>…</think>`, then exactly one non-empty `<answer>…</answer>`, and nothing after.

    Thinking is allowed, not required: the format reward must not pay for reasoning, so that RL
    has to discover by itself that reasoning raises accuracy (departure from R1, whose format
    reward asks for the `<think>` tags). An empty answer is no answer: it earns no format credit.
    """
    text = completion.strip()
    think = THINK_RE.match(text)
    rest = text[think.end():] if think else text
    if "<think>" in rest or "</think>" in rest:
        return False
    rest = rest.strip()
    return (rest.startswith("<answer>") and rest.endswith("</answer>")
            and rest.count("<answer>") == 1 and rest.count("</answer>") == 1 and bool(rest[8:-9].strip()))


def thought(completion: str) -> bool:
    """Did the completion reason inside a non-empty `<think>…</think>` before answering?"""
    match = THINK_RE.match(completion)
    return bool(match and match.group(1).strip())
