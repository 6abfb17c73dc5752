"""The one exception type a user ever sees from wgen."""

from __future__ import annotations


class WgenError(Exception):
    """A user-facing failure: a one-line ``message`` plus a ``hint`` saying what to do.

    The CLI prints it as one red line and the hint, and exits with status 2. Anything else
    that escapes is a bug (exit 1, traceback).
    """

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message
