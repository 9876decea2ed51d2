"""`jsonl:PATH`: any file with `prompt` and `answer` columns (JSONL, Parquet or a saved HF dataset).

The `<answer>` is correct when it equals the gold after stripping whitespace, or when both parse
as the same number (`parse_number`: `1,000` == `1000.0`).

    get_task("jsonl:my_problems.jsonl")
    get_task("jsonl:train.parquet", eval_data="test.parquet")
"""

from aha.tasks.base import Problem, extract_answer, is_well_formed
from aha.tasks.data import RowTask, require
from aha.tasks.gsm8k import parse_number


def answers_match(predicted: str | None, gold: str) -> bool:
    """
    >>> answers_match(" Paris ", "Paris"), answers_match("1,000", "1000.0"), answers_match("paris", "Paris")
    (True, True, False)
    """
    if predicted is None:
        return False
    if predicted.strip() == gold.strip():
        return True
    number, gold_number = parse_number(predicted), parse_number(gold)
    return number is not None and number == gold_number


class JsonlTask(RowTask):
    def __init__(self, data, **options):
        self.name = f"jsonl:{data}"
        super().__init__(data=data, **options)

    def parse_row(self, row: dict) -> Problem:
        return Problem(question=require(row, "prompt"), answer=require(row, "answer").strip(), meta=row)

    def score(self, completion: str, problem: Problem) -> dict[str, float]:
        correct = answers_match(extract_answer(completion), problem.answer)
        return {"accuracy": float(correct), "format": float(is_well_formed(completion))}
