"""Progress bars with an ETA for every long phase (rich).

rich is imported on first use, so that the modules which import this one (aha/core/train.py among
them) also import on a machine with torch and transformers alone: bench/gpu_check.py calls the
training step's functions there without ever drawing a bar."""

import functools


@functools.cache
def _rich():
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    class _Progress(Progress):
        def __exit__(self, exc_type, exc_value, traceback):
            if exc_type is None:
                return super().__exit__(exc_type, exc_value, traceback)
            self.live.transient = (
                True  # a failed phase leaves no bar (nor blank line): the error's one line is the last word
            )
            self.live.stop()

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    return Console(stderr=True), _Progress, columns


def __getattr__(name: str):
    if name == "console":                     # `from aha.infra.progress import console`: the stderr console
        return _rich()[0]
    raise AttributeError(f"module 'aha.infra.progress' has no attribute {name!r}")


def progress_bar(out=None):
    console, progress, columns = _rich()
    return progress(*columns, console=out or console, transient=False)
