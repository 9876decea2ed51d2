"""The one exception type users see: a clear one-line message, exit code 2 (see `aha.cli.main`)."""


class AhaError(Exception):
    """Bad input from the user: what is wrong, where, and what to do, in one line."""


class Stopped(Exception):
    """The run stopped on SIGTERM/SIGINT after writing a checkpoint; the CLI exits 128 + signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
