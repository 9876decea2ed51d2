"""Live dashboards through the field's own tools: TensorBoard and Weights & Biases (`report_to`).

    aha train --out runs/x report_to=tensorboard        # then: tensorboard --logdir runs/x/tensorboard
    aha run --out runs/y report_to=tensorboard,wandb    # W&B offline, in runs/y/wandb

`metrics.jsonl` stays the source of truth; a tracker receives the same numbers as they are written:
every number of a step's line as `train/<key>` at that line's `step`, and each held-out evaluation
(`aha run`'s before and after, and every `eval_every`) as `eval/<metric>` at the steps done (0 before
training). Booleans go as 0/1; text and missing values (entropy with no trained row) are not sent.
Both are optional extras (`pip install 'aha[logging]'`); a name whose package is missing stops the
run before anything runs, with the pip command.

TensorBoard: `torch.utils.tensorboard.SummaryWriter` in OUT/tensorboard, flushed after every step so
the dashboard is live; a resumed run opens it with `purge_step` = the step it resumes at, so
TensorBoard hides what the crashed run logged past its last checkpoint.
W&B: offline unless `WANDB_MODE` says otherwise (nothing leaves the machine; `wandb sync
OUT/wandb/offline-run-*` uploads later), project `$WANDB_PROJECT` or "aha", the resolved config
as the run's config. A resumed run is a new W&B run in the same group (the run folder's name):
W&B cannot rewind an offline run.
"""

import importlib.util
import math
import os
from contextlib import nullcontext
from pathlib import Path

from aha.infra.errors import AhaError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}     # report_to name → the package it needs
NOT_METRICS = {"samples", "k", "problems", "temperature", "top_p", "step"}


def parse_report_to(text: str) -> tuple[str, ...]:
    """`"tensorboard, wandb"` → ("tensorboard", "wandb"); "" → (); an AhaError for an unknown name or a
    package that is not installed.

    >>> parse_report_to(""), parse_report_to(" ")
    ((), ())
    """
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    for name in names:
        if name not in PACKAGES:
            raise AhaError(
                f'config: report_to names {name!r}; choose from {", ".join(PACKAGES)} (comma-separated), or ""'
            )
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise AhaError(f"config: report_to={name} needs the {PACKAGES[name]} package: pip install 'aha[logging]'")
    return names


def numbers(values: dict) -> dict[str, float]:
    """The numeric entries of a record, booleans as 0/1.

    >>> numbers({"step": 3, "loss": 0.5, "skipped_update": False, "entropy": None, "note": "x", "samples": []})
    {'loss': 0.5, 'skipped_update': 0.0}
    """
    return {key: float(value) for key, value in values.items()
            if key not in NOT_METRICS and isinstance(value, (int, float))}


class TensorBoard:
    def __init__(self, out: Path, config: dict, first_step: int):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=first_step or None)
        if not first_step:
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()), 0)

    def log(self, prefix: str, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Wandb:
    def __init__(self, out: Path, config: dict, first_step: int):
        import wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "aha"), name=out.name, group=out.name,
                              dir=str(out), config=config, mode=os.environ.get("WANDB_MODE", "offline"),
                              settings=wandb.Settings(silent=True, console="off"),
                              tags=["resumed"] if first_step else None)

    def log(self, prefix: str, values: dict[str, float], step: int) -> None:
        self.run.log({f"{prefix}/{key}": value for key, value in values.items() if math.isfinite(value)}, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoard, "wandb": Wandb}


class Trackers:
    """The chosen trackers as one; with none it does nothing. A context manager that closes them."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log_step(self, record: dict) -> None:
        for tracker in self.trackers:
            tracker.log("train", numbers(record), record["step"])

    def log_eval(self, steps_done: int, result: dict) -> None:
        for tracker in self.trackers:
            tracker.log("eval", numbers(result), steps_done)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_trackers(report_to: str, out: Path, config: dict, first_step: int = 0) -> Trackers:
    return Trackers([TRACKERS[name](Path(out), config, first_step) for name in parse_report_to(report_to)])


def trackers_for(report_to: str, out: Path, config: dict, first_step: int, given: Trackers | None, writes: bool):
    """The context the training loop logs into: the caller's trackers (left open: `aha run` logs its
    last evaluation after training), new ones on the process that writes the run folder, else none."""
    if given is not None:
        return nullcontext(given)
    return open_trackers(report_to, out, config, first_step) if writes else Trackers([])
