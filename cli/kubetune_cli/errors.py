"""The one exception commands raise to end with a message and an exit code (no traceback)."""

from __future__ import annotations

# Exit codes shared by the commands.
EXIT_OK = 0
EXIT_FAILED = 1  # the work itself failed (training, serving, a query)
EXIT_USAGE = 2  # a bad manifest, a bad argument: nothing was started
EXIT_ENVIRONMENT = 3  # something this machine lacks (a tool, the serving venv, a running dev cluster)
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """End the command with `message` on stderr and exit `code`."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
