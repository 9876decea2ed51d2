"""File-backed tasks: rows loaded through `datasets`, a deterministic held-out split, a training
stream, and bad rows reported by file and line.

Formats: JSONL (`.jsonl`, `.json`), Parquet (`.parquet`), or a local HF dataset directory saved
with `save_to_disk` (a `DatasetDict` must have a `train` split). Nothing is downloaded.

Held-out split: a row is held out when a fixed hash of its question falls in the lowest
`eval_fraction` of the hash range, so duplicates of a question land on the same side and adding
rows never moves an old row across. With a separate `eval_data` file, every row of that file is
held out and training drops the rows whose question appears in it.

Subclasses turn a row into a `Problem` in `parse_row`, raising `BadRow` when a field is missing.
"""

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path

from aha.infra.errors import AhaError
from aha.tasks.base import Problem, Task

HASH_RANGE = 1 << 32


class BadRow(ValueError):
    """A row that cannot become a problem; the message says what is missing."""


def stable_hash(text: str) -> int:
    """A hash in [0, 2**32) that is the same in every process (Python's `hash` of str is not)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=4).digest(), "big")


def in_heldout(key: str, fraction: float) -> bool:
    return stable_hash(key) < fraction * HASH_RANGE


def split_heldout(problems: list[Problem], fraction: float) -> tuple[list[Problem], list[Problem]]:
    """(training problems, held-out problems), each in the given order, split by `in_heldout` of the question."""
    heldout = [p for p in problems if in_heldout(p.question, fraction)]
    return [p for p in problems if not in_heldout(p.question, fraction)], heldout


def load_rows(path: str | Path) -> list[dict]:
    """All rows of a JSONL / Parquet file or a saved HF dataset directory, as dicts, in file order."""
    path = Path(path)
    if not path.exists():
        raise AhaError(f"data file {path} does not exist")
    try:
        import datasets
    except ImportError as exc:
        raise AhaError(f"reading {path} needs the datasets package: pip install datasets") from exc
    verbosity = datasets.logging.get_verbosity()
    try:
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)   # its error logs repeat the AhaError below
        if path.is_dir():
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if "train" not in dataset:
                    raise AhaError(f"{path}: a dataset dict needs a 'train' split; it has {list(dataset)}")
                dataset = dataset["train"]
        elif path.suffix in (".jsonl", ".json"):
            dataset = datasets.load_dataset("json", data_files=str(path), split="train")
        elif path.suffix == ".parquet":
            dataset = datasets.load_dataset("parquet", data_files=str(path), split="train")
        else:
            raise AhaError(f"{path}: unknown data format; use .jsonl, .parquet or a saved HF dataset directory")
        return dataset.to_list()
    except AhaError:
        raise
    except Exception as exc:   # arrow / json decoding errors: name the file, keep one line
        if path.is_file() and path.stat().st_size < 1 << 20 and not path.read_bytes().strip():
            raise AhaError(f"data file {path} is empty: write one JSON object per line") from None
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AhaError(f"{path}: cannot read it as data ({first_line}); use JSONL (one JSON object per line), "
                       "Parquet, or a dataset dir saved with save_to_disk") from exc
    finally:
        datasets.logging.set_verbosity(verbosity)


class RowTask(Task):
    """A task whose problems are the rows of a data file. Subclasses define `name`,
    `parse_row(row) -> Problem` and `score(completion, problem)`."""

    name = "rows"

    def __init__(self, data: str | Path | None = None, eval_data: str | Path | None = None,
                 eval_fraction: float = 0.1, skip_bad_rows: bool = False):
        if data is None:
            raise AhaError(f"task {self.name} needs a data file: pass data=PATH (--data PATH)")
        if not 0.0 <= eval_fraction < 1.0:
            raise AhaError(f"{self.name}: eval_fraction={eval_fraction} must be in [0, 1)")
        self.skip_bad_rows = skip_bad_rows
        self.skipped_rows = 0
        problems = self._load(data)
        if eval_data is not None:
            self.heldout = self._load(eval_data)
            held = {p.question for p in self.heldout}
            self.train = [p for p in problems if p.question not in held]
        else:
            self.train, self.heldout = split_heldout(problems, eval_fraction)
        if not self.train:
            raise AhaError(f"{self.name}: {data} has no training rows left after the held-out split")

    def _load(self, path) -> list[Problem]:
        problems = []
        for index, row in enumerate(load_rows(path)):
            try:
                problems.append(self.parse_row(row))
            except BadRow as exc:
                if not self.skip_bad_rows:
                    raise AhaError(f"{path}:{index + 1}: {exc} (pass skip_bad_rows=True to skip such rows)") from None
                self.skipped_rows += 1
        return problems

    def parse_row(self, row: dict) -> Problem:
        raise NotImplementedError

    def train_problems(self, seed: int) -> Iterator[Problem]:
        """Endless: each epoch is the training rows in a fresh order drawn from (seed, epoch)."""
        epoch = 0
        while True:
            order = list(range(len(self.train)))
            random.Random(f"{seed}/{epoch}").shuffle(order)
            for i in order:
                yield self.train[i]
            epoch += 1

    def eval_problems(self, n: int) -> list[Problem]:
        """The first n held-out rows in file order (all of them when there are fewer)."""
        return self.heldout[:n]

    def prompt(self, problem: Problem) -> str:
        return f"User: {problem.question}\nAssistant:"


def require(row: dict, field: str) -> str:
    """The row's field as a non-empty string, or BadRow naming the field."""
    value = row.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise BadRow(f"missing field {field!r}")
    if isinstance(value, (list, dict)):
        raise BadRow(f"field {field!r} must be text or a number, got a {type(value).__name__}")
    return str(value)
