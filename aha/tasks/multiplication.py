"""`multiplication`: multiply a `digits`-digit number by a `multiplier_digits`-digit one (4 × 3 in the
tool demo), checked exactly — a task where the scratchpad is long and error-prone and a tool call
is short and reliable.

The pretraining corpus (`corpus_document`, aha/stages/pretrain.py) shows two ways to a worked answer:
- the scratchpad: one partial product per digit of the multiplier, then their running sum
  (`<think>4821*7=33747, 4821*90=433890, 4821*300=1446300, 33747+433890=467637,
  467637+1446300=1913937</think>`), ~80 tokens in which a tiny model gets some digit wrong;
- the tool: `<think><tool>4821*397</tool><output>1913937</output></think>`, where `<output>…</output>`
  is what the python tool prints (aha/core/tools/): a dozen tokens of the model's own, then a copy.
Only `tool_frac` of the worked answers (20% by default) call the tool, chosen by a hash of the
problem. So the base model mostly works by hand and mostly errs; RL with `tools=python` has to
find out that calling the tool pays. Without tools the same calls get no output.

Held-out split as in aha/tasks/addition.py: an ordered pair (a, b) is held out when a fixed hash of
it is 0 mod 10; the training stream and the corpus never contain one.
"""

import random
from collections.abc import Iterator

from aha.infra.errors import AhaError
from aha.tasks.addition import ASCII_NUMBER_RE
from aha.tasks.base import Problem, Task, extract_answer, is_well_formed

HELDOUT_MOD = 10
EVAL_SEED = 4321


def _hash(a: int, b: int, salt: int) -> int:
    return (a * 1_000_003 + b * 7_919 + salt) * 2_654_435_761 % 4_294_967_291


def is_heldout(a: int, b: int) -> bool:
    return _hash(a, b, 0) % HELDOUT_MOD == 0


def scratchpad(a: int, b: int) -> str:
    """`<think>4821*7=33747, 4821*90=433890, 4821*300=1446300, 33747+433890=467637, …</think>`."""
    digits = str(b)[::-1]
    partial = [a * int(d) * 10 ** i for i, d in enumerate(digits)]
    steps = [f"{a}*{int(d) * 10 ** i}={p}" for i, (d, p) in enumerate(zip(digits, partial))]
    total = partial[0]
    for p in partial[1:]:
        steps.append(f"{total}+{p}={total + p}")
        total += p
    return "<think>" + ", ".join(steps) + "</think>"


def tool_solution(a: int, b: int) -> str:
    """`<think><tool>4821*397</tool><output>1913937</output></think>`: what the python tool shows."""
    return f"<think><tool>{a}*{b}</tool><output>{a * b}</output></think>"


class MultiplicationTask(Task):
    name = "multiplication"
    writes_corpus = True
    tokenizer_tags = ("<tool>", "</tool>", "<output>", "</output>")   # its base model spells them as one token each

    def __init__(self, digits: int = 4, multiplier_digits: int = 3, tool_frac: float = 0.2):
        if not 1 <= digits <= 9 or not 1 <= multiplier_digits <= 9 or not 0 <= tool_frac <= 1:
            raise AhaError(f"multiplication: digits={digits} and multiplier_digits={multiplier_digits} must be 1..9, "
                           f"tool_frac={tool_frac} in [0, 1]")
        self.digits, self.multiplier_digits, self.tool_frac = digits, multiplier_digits, tool_frac

    def _pair(self, rng: random.Random) -> tuple[int, int]:
        low = lambda n: 10 ** (n - 1) if n > 1 else 0
        return rng.randint(low(self.digits), 10 ** self.digits - 1), rng.randint(low(self.multiplier_digits),
                                                                                10 ** self.multiplier_digits - 1)

    def _problem(self, a: int, b: int) -> Problem:
        return Problem(question=f"{a}*{b}", answer=str(a * b), meta={"a": a, "b": b})

    def train_problems(self, seed: int) -> Iterator[Problem]:
        rng = random.Random(seed)
        while True:
            a, b = self._pair(rng)
            if not is_heldout(a, b):
                yield self._problem(a, b)

    def eval_problems(self, n: int) -> list[Problem]:
        rng, seen, out = random.Random(EVAL_SEED), set(), []
        while len(out) < n:
            a, b = self._pair(rng)
            if is_heldout(a, b) and (a, b) not in seen:
                seen.add((a, b))
                out.append(self._problem(a, b))
        return out

    def prompt(self, problem: Problem) -> str:
        return f"User: {problem.question}\nAssistant:"

    def calls_tool(self, problem: Problem) -> bool:
        """Does this problem's worked answer in the corpus call the tool? (`tool_frac` of them, by hash)"""
        return _hash(problem.meta["a"], problem.meta["b"], 17) % 1000 < 1000 * self.tool_frac

    def corpus_document(self, problem: Problem, think: bool) -> str:
        """The prompt and a worked answer: the scratchpad, or (tool_frac of them) the tool call and its
        output. `think=False` (the corpus's direct answers) drops the working: the answer at once."""
        a, b = problem.meta["a"], problem.meta["b"]
        working = (tool_solution(a, b) if self.calls_tool(problem) else scratchpad(a, b)) + " " if think else ""
        return f"{self.prompt(problem)} {working}<answer>{a * b}</answer>"

    def score(self, completion: str, problem: Problem) -> dict[str, float]:
        answer = extract_answer(completion)
        correct = (
            answer is not None and ASCII_NUMBER_RE.fullmatch(answer) is not None and int(answer) == int(problem.answer)
        )
        return {"accuracy": float(correct), "format": float(is_well_formed(completion))}
