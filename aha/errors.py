"""The one exception type users see: a clear one-line message, exit code 2 (see `aha.cli.main`)."""


class AhaError(Exception):
    """Bad input from the user: what is wrong, where, and what to do, in one line."""
