"""GSM8K: grade-school word problems with a numeric answer, from a local file.

Rows have `question` and `answer`, the answer being a worked solution that ends `#### 72`. The
gold is the text after the last `####`, commas, `$` and spaces removed. The model's `<answer>`
is compared as a number (exactly, as fractions: `72`, `72.0`, `$72`, `1,000` all parse; `1,2,3`,
`0 123` and digits other than ASCII do not).

    get_task("gsm8k", data="gsm8k_train.jsonl")     # 10% held out by a hash of the question
"""

import re
from fractions import Fraction

from aha.tasks.base import Problem, extract_answer, is_well_formed
from aha.tasks.data import BadRow, RowTask, require

# ASCII digits only (`\d` would take '١٢٣', which Fraction reads as 123); thousands separated by
# commas or spaces only in groups of three after a non-zero digit, so that a list such as "1,2,3",
# "1 2 3" or "0 123" is not a number
NUMBER_RE = re.compile(
    r"[+-]?([1-9]\d{0,2}(,\d{3})+|[1-9]\d{0,2}( \d{3})+|\d+)(\.\d*)?([eE][+-]?\d{1,3})?|[+-]?\.\d+([eE][+-]?\d{1,3})?",
    re.ASCII,
)
BOXED_RE = re.compile(r"^\\boxed\{(.*)\}$", re.DOTALL)


def parse_number(text: str | None) -> Fraction | None:
    """A number written the ways people write answers, or None.

    >>> parse_number("$1,234.50")
    Fraction(2469, 2)
    >>> parse_number("72.") == parse_number("\\\\boxed{72}") == parse_number("$72$") == parse_number("7.2e1") == 72
    True
    >>> parse_number("72 apples") is None, parse_number("9" * 200) is None, parse_number("1,2,3") is None
    (True, True, True)
    """
    if text is None:
        return None
    text = text.strip()
    boxed = BOXED_RE.match(text)
    if boxed:
        text = boxed.group(1).strip()
    text = text.removeprefix("$").removesuffix("$").strip()      # currency, or $…$ math mode
    text = text.removesuffix(".")                               # the sentence's full stop
    if len(text) > 60 or not NUMBER_RE.fullmatch(text):          # length cap: no giant integers
        return None
    return Fraction(text.replace(",", "").replace(" ", ""))


class GSM8KTask(RowTask):
    name = "gsm8k"

    def parse_row(self, row: dict) -> Problem:
        question, solution = require(row, "question"), require(row, "answer")
        if "####" not in solution:
            raise BadRow("the answer has no '#### <number>' line")
        gold = solution.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "").replace(" ", "")
        if parse_number(gold) is None:
            raise BadRow(f"the text after '####' is not a number: {gold[:40]!r}")
        return Problem(question=question, answer=gold, meta={"solution": solution})

    def score(self, completion: str, problem: Problem) -> dict[str, float]:
        predicted = parse_number(extract_answer(completion))
        correct = predicted is not None and predicted == parse_number(problem.answer)
        return {"accuracy": float(correct), "format": float(is_well_formed(completion))}
