"""Progress bars with an ETA for every long phase (rich)."""

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


class _Progress(Progress):
    def __exit__(self, exc_type, exc_value, traceback):
        if exc_type is None:
            return super().__exit__(exc_type, exc_value, traceback)
        self.live.transient = True    # a failed phase leaves no bar (nor blank line): the error's one line is the last word
        self.live.stop()


def progress_bar(out: Console | None = None) -> Progress:
    return _Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                     TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                     console=out or console, transient=False)
