"""Start-up failures as one line for the operator, and the exit status that goes with them.

Exit status 2: the configuration is wrong (fix the file). Exit status 1: the host is
not as the configuration needs it (a lock held, a device missing, a socket in use).
The command line (bridge/cli.py ``explain``) turns every other failure into one of
these, looking through trio's exception groups, so that what reaches the operator is
the one reason, never a traceback. Neutral: imports nothing of the bridge.
"""

from __future__ import annotations

EXIT_ENVIRONMENT = 1
EXIT_CONFIG = 2


class StartupError(Exception):
    """A reason the bridge cannot start, worded for the operator: it names the file,
    socket, device or field and says what to do."""

    def __init__(self, message: str, exit_code: int = EXIT_ENVIRONMENT) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
