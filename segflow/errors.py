"""The one error type for problems a user can cause and fix.

Anything raised as `SegflowError` is printed by the CLI without a traceback and ends the process
with exit code 2. Its message says what is wrong, where (file or setting) and what to do.
Bugs stay ordinary exceptions so that their tracebacks are not hidden.
"""

from __future__ import annotations

from segflow.redact import redact


class SegflowError(Exception):
    """A problem with the user's input, configuration or environment."""

    exit_code = 2

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        self.problems = list(problems or [])
        if self.problems:
            shown = self.problems[:20]
            more = len(self.problems) - len(shown)
            message = message + "\n" + "\n".join(f"  - {p}" for p in shown)
            if more:
                message += f"\n  ... and {more} more"
        super().__init__(redact(message))  # a URI with a password in it is never printed
