"""Countdown, as in TinyZero: reach a target from 3–4 numbers with + − × ÷, each number used once.

Problems are generated: draw the numbers (1..99), combine them in a random order with random
operations (division only when exact, subtraction only when positive) and keep the result as the
target when it lies in 1..100, so every target is reachable with all the numbers.

Reward, as TinyZero (`tinyzero` component): 0.0 when no `<answer>` can be extracted or it is empty, 0.1 when
there is one but it does not use each number exactly once or has the wrong value (or is no
arithmetic at all), 1.0 when it is right. `accuracy` is 1.0 only when right; `format` is the shared
well-formedness check. Weights accuracy 0, format 0, tinyzero 1 reproduce TinyZero's reward.

The answer is evaluated from its `ast`, never with `eval`: only integer literals, + - * /, unary
minus and parentheses, at most `MAX_EXPRESSION_CHARS` characters, in exact fractions. Names,
calls, `**`, attributes and everything else score as wrong.

Held-out split: a problem is held out when a fixed hash of its sorted numbers and target is 0 mod
10; evaluation draws only those, training never yields one.
"""

import ast
import random
from collections.abc import Iterator
from fractions import Fraction

from aha.infra.errors import AhaError
from aha.tasks.base import Problem, Task, extract_answer, is_well_formed
from aha.tasks.data import stable_hash

HELDOUT_MOD = 10
EVAL_SEED = 4321
MAX_EXPRESSION_CHARS = 200
MAX_TARGET = 100
OPERATORS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
             ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}
QUESTION = ("Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
            "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work in "
            "<think> </think> tags. And return the final answer in <answer> </answer> tags, for example "
            "<answer> (1 + 2) / 3 </answer>.")


def is_heldout(numbers: list[int], target: int) -> bool:
    return stable_hash(f"{sorted(numbers)}={target}") % HELDOUT_MOD == 0


def parse_expression(text: str) -> tuple[Fraction, list[int]] | None:
    """The exact value of an arithmetic expression and the integers it uses; None if it is not one.

    >>> parse_expression("(1 + 2) / 3")
    (Fraction(1, 1), [1, 2, 3])
    >>> [parse_expression(t) for t in ["9**9**9", "__import__('os')", "1/0", "2 +"]]
    [None, None, None, None]
    """
    text = text.replace("×", "*").replace("÷", "/").replace("−", "-").strip()
    if not text or len(text) > MAX_EXPRESSION_CHARS:
        return None
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    numbers: list[int] = []

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            numbers.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            inner = value(node.operand)
            return -inner if isinstance(node.op, ast.USub) else inner
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"not allowed: {type(node).__name__}")

    try:
        return value(tree.body), numbers
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def tinyzero_reward(answer: str | None, numbers: list[int], target: int) -> float:
    """TinyZero's countdown reward for an extracted answer (None: no answer).

    >>> tinyzero_reward("(44 - 19) * 2 + 1", [1, 2, 19, 44], 51)
    1.0
    >>> numbers = [1, 2, 19, 44]
    >>> tinyzero_reward("44 + 7", numbers, 51), tinyzero_reward(None, numbers, 51), tinyzero_reward("", [1], 1)
    (0.1, 0.0, 0.0)
    """
    if not answer:                   # no answer, or an empty one: TinyZero's 0.1 would pay for `<answer></answer>`
        return 0.0
    parsed = parse_expression(answer)
    if parsed is None:
        return 0.1
    result, used = parsed
    return 1.0 if sorted(used) == sorted(numbers) and result == target else 0.1


class CountdownTask(Task):
    name = "countdown"

    def __init__(self, min_numbers: int = 3, max_numbers: int = 4, max_number: int = 99):
        if not 2 <= min_numbers <= max_numbers <= 6:
            raise AhaError(f"countdown: need 2 <= min_numbers <= max_numbers <= 6, got {min_numbers}..{max_numbers}")
        self.min_numbers, self.max_numbers, self.max_number = min_numbers, max_numbers, max_number

    def _draw(self, rng: random.Random) -> Problem:
        """Draw numbers and combine them at random until the result is a valid target."""
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(rng.randint(self.min_numbers, self.max_numbers))]
            pool = [(n, str(n)) for n in numbers]
            rng.shuffle(pool)
            while len(pool) > 1:
                (a, ea), (b, eb) = pool.pop(), pool.pop()
                options = [(a + b, f"({ea} + {eb})"), (a * b, f"({ea} * {eb})")]
                if a != b:
                    options.append((abs(a - b), f"({ea} - {eb})" if a > b else f"({eb} - {ea})"))
                if b and a % b == 0:
                    options.append((a // b, f"({ea} / {eb})"))
                if a and b % a == 0:
                    options.append((b // a, f"({eb} / {ea})"))
                pool.append(rng.choice(options))
            target, solution = pool[0]
            if 1 <= target <= MAX_TARGET:
                return Problem(question=QUESTION.format(numbers=numbers, target=target), answer=solution,
                               meta={"numbers": numbers, "target": target})

    def train_problems(self, seed: int) -> Iterator[Problem]:
        rng = random.Random(seed)
        while True:
            problem = self._draw(rng)
            if not is_heldout(problem.meta["numbers"], problem.meta["target"]):
                yield problem

    def eval_problems(self, n: int) -> list[Problem]:
        rng, seen, out = random.Random(EVAL_SEED), set(), []
        while len(out) < n:
            problem = self._draw(rng)
            key = (tuple(sorted(problem.meta["numbers"])), problem.meta["target"])
            if is_heldout(*key) and key not in seen:
                seen.add(key)
                out.append(problem)
        return out

    def prompt(self, problem: Problem) -> str:
        return f"User: {problem.question}\nAssistant:"

    def score(self, completion: str, problem: Problem) -> dict[str, float]:
        reward = tinyzero_reward(extract_answer(completion), problem.meta["numbers"], problem.meta["target"])
        return {"accuracy": float(reward == 1.0), "format": float(is_well_formed(completion)),
                "tinyzero": reward}
