"""Start-up failures as one line for the operator, and the exit status that goes with them.

Exit status 2: the configuration is wrong (fix the file). Exit status 1: the host is
not as the configuration needs it (a lock held, a device missing, a socket in use).
trio wraps exceptions raised in nursery tasks in ExceptionGroups; ``explain`` looks
through them, so that what reaches the command line is the one reason, never a
traceback.
"""

from __future__ import annotations

import json

EXIT_ENVIRONMENT = 1
EXIT_CONFIG = 2


class StartupError(Exception):
    """A reason the bridge cannot start, worded for the operator: it names the file,
    socket, device or field and says what to do."""

    def __init__(self, message: str, exit_code: int = EXIT_ENVIRONMENT) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for sub in exc.exceptions:
            out.extend(_leaves(sub))
        return out
    return [exc]


def explain(exc: BaseException) -> StartupError | None:
    """The StartupError an exception (or a group of them) stands for, None if it is a bug.

    Known kinds from the layers below are translated: a damaged reservation file, an OS
    error naming a file, a core ValueError about an image.
    """
    from bridge.config import ConfigError
    from bridge.target.reservations_state import ReservationStateError

    for leaf in _leaves(exc):
        if isinstance(leaf, StartupError):
            return leaf
        if isinstance(leaf, ConfigError):
            return StartupError(f"configuration error: {leaf}", EXIT_CONFIG)
        if isinstance(leaf, ReservationStateError):
            # A damaged APTPL file stops the bridge: dropping it would silently lose reservations.
            return StartupError(f"{leaf}; move it away or repair it to start", EXIT_ENVIRONMENT)
        if isinstance(leaf, json.JSONDecodeError):
            return StartupError(f"damaged JSON: {leaf}", EXIT_ENVIRONMENT)
        if isinstance(leaf, OSError):
            where = f"{leaf.filename}: " if leaf.filename else ""
            return StartupError(f"{where}{leaf.strerror or leaf}", EXIT_ENVIRONMENT)
        if isinstance(leaf, ValueError) and str(leaf).startswith(("path:", "size:", "block_size:")):
            return StartupError(f"logical unit: {leaf}", EXIT_CONFIG)
    return None
