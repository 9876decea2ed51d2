"""`champ`: CHAMP (Mao et al. 2024), 270 competition-level maths problems with final answers, read
from the installed `champ-dataset` wheel (`pip install champ-dataset`, MIT; nothing is downloaded).

    aha eval --task champ --model DIR --k 4 --problems 50 --max-new-tokens 512

CHAMP's answers are written for people ("`@@C(10, 5)@@`, or equivalently `@@252@@`", "No integer
solutions"), and its paper graded them with GPT-4. Here only the answers a program can check are
kept, 204 of the 270 (`excluded` counts the other 66):
  - Yes / No: the first word of the model's answer, case-insensitive;
  - a number or a formula: CHAMP's plain-text maths (`2^(n-1)`, `C(n, 4)`, `floor(n/2)!`, intervals) is
    read by SymPy's `parse_expr` (trusted data, at load time) and written out as LaTeX, then graded
    by math-verify against the model's `<answer>` exactly as the `math` task grades (aha/tasks/math_task.py:
    worker processes, a timeout, a cache), any of the stated equivalent forms counting;
  - dropped: prose ("No such values"), lists of solutions (`x=6, y=5`), inequalities, ±, ellipses,
    and the leading number of "100 (i.e., all values)" or "3 is the only possible value" is kept.

Split: a hash of the question holds out `eval_fraction` (0.5: 116 problems) of the kept ones; `aha train`
learns on the rest. The prompt asks for the final answer alone inside `<answer> </answer>`.
"""

import json
import re

from aha.infra.errors import AhaError
from aha.tasks.base import Problem, extract_answer, is_well_formed
from aha.tasks.data import RowTask, split_heldout
from aha.tasks.math_task import MAX_ANSWER_CHARS, MathGrader
from aha.tasks.wheels import wheel_file

INSTRUCTION = "Give the final answer alone inside <answer> </answer>: a number, a formula, or Yes/No."
SPAN_RE = re.compile(r"@@(.*?)@@")
NUMBER_RE = re.compile(r"[+-]?\d+(\.\d+)?")
# "3 is the only possible value", "100 (i.e., all values)", "The limit exists and is equal to @@2/3@@"
LEADING_FORMS = [
    re.compile(p)
    for p in (
        r"^(.+?) is the only possible value$",
        r"^(.+?) \((?:i\.e\.,|no |none )[^)]*\)$",
        r"^The limit exists and is equal to (.+)$",
        r"^The only possible value for the limit is (.+)$",
    )
]
NOT_ONE_VALUE = ("=", "<", ">", "≥", "≤", "±", "...", "sum_")


def plain_alternatives(raw: str) -> list[str] | None:
    """The answer's equivalent forms as plain-text maths, or None when it is not one value.

    >>> plain_alternatives("@@C(10, 5)@@, or equivalently @@252@@"), plain_alternatives("100 (i.e., all values)")
    (['C(10, 5)', '252'], ['100'])
    >>> plain_alternatives("@@5/14@@, or approximately 35.7%"), plain_alternatives("@@x=6, y=5@@")
    (['5/14'], None)
    """
    text = raw.strip().replace("−", "-")          # one answer writes a Unicode minus
    for form in LEADING_FORMS:
        match = form.match(text)
        if match:
            text = match.group(1).strip()
            break
    parts = re.split(r", or (?:equivalently |an equivalent form such as )?", text)
    forms = []
    for part in (p.strip() for p in parts if not p.startswith("approximately")):
        span = SPAN_RE.fullmatch(part)
        if span:
            forms.append(span.group(1).strip())
        elif NUMBER_RE.fullmatch(part):
            forms.append(part)
        else:
            return None
    if not forms or any(mark in form for form in forms for mark in NOT_ONE_VALUE):
        return None
    return forms


def to_latex(plain: str) -> str | None:
    """CHAMP's plain-text maths as LaTeX through SymPy (`^` is a power, `C` the binomial, `n!` a
    factorial, juxtaposition a product); None when SymPy cannot read it.

    >>> to_latex("n(n+1)*2^(n-2)"), to_latex("C(10, 5)"), to_latex("[-1, 1]")
    ('2^{n - 2} n \\\\left(n + 1\\\\right)', '252', '\\\\left[-1, 1\\\\right]')
    """
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor,
        factorial_notation,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )
    transformations = standard_transformations + (implicit_multiplication_application, convert_xor, factorial_notation)
    try:
        if plain.startswith("[") and plain.endswith("]"):     # a closed interval
            low, high = (parse_expr(x, transformations=transformations) for x in plain[1:-1].split(","))
            return sympy.latex(sympy.Interval(low, high))
        value = parse_expr(plain, transformations=transformations, local_dict={"C": sympy.binomial})
    except Exception:             # SymPy raises many types on text it cannot read
        return None
    return sympy.latex(value)


def gold_answers(raw: str) -> tuple[str, ...] | None:
    """("yes",) / ("no",), or the LaTeX forms math-verify compares against; None: not gradable by a program."""
    if raw.strip() in ("Yes", "No"):
        return (raw.strip().lower(),)
    forms = plain_alternatives(raw)
    latex = [to_latex(form) for form in forms] if forms else []
    kept = tuple(dict.fromkeys(form for form in latex if form))
    return kept or None


class ChampTask(RowTask):
    name = "champ"

    def __init__(self, eval_fraction: float = 0.5, workers: int = 2, timeout: float = 5.0):
        if not 0.0 < eval_fraction < 1.0:
            raise AhaError(f"champ: eval_fraction={eval_fraction} must be in (0, 1)")
        try:
            import math_verify  # noqa: F401  fail now, with a clear message, not in a worker
        except ImportError:
            raise AhaError("the champ task needs math-verify: pip install math-verify") from None
        path = wheel_file("champ_dataset", "dataset_files/v0.json", "champ-dataset", self.name)
        rows = json.loads(path.read_text(encoding="utf-8"))["problems"]
        problems, self.excluded = [], 0
        for identifier, row in rows.items():
            golds = gold_answers(row["_raw_answer"])
            if golds is None:
                self.excluded += 1
                continue
            problems.append(Problem(question=f"{row['_text'].strip()}\n{INSTRUCTION}", answer=golds[0],
                                    meta={"golds": golds, "id": identifier, "category": row["category"],
                                          "stated_answer": row["_answer"]}))
        self.skip_bad_rows, self.skipped_rows = False, 0
        self.train, self.heldout = split_heldout(problems, eval_fraction)
        self.grader = MathGrader(workers, timeout)

    def correct(self, answer: str | None, problem: Problem) -> bool:
        golds = problem.meta["golds"]
        if not answer or len(answer) > MAX_ANSWER_CHARS:
            return False
        if golds[0] in ("yes", "no"):
            first = re.match(r"[A-Za-z]+", answer.strip())
            return bool(first) and first.group(0).lower() == golds[0]
        return any(self.grader.verify(gold, answer) for gold in golds)

    def score(self, completion: str, problem: Problem) -> dict[str, float]:
        return {"accuracy": float(self.correct(extract_answer(completion), problem)),
                "format": float(is_well_formed(completion))}
