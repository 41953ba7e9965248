"""Log lines a guest can provoke, without letting a guest flood the log.

A guest (vfio-user client, Xen frontend, virtio driver) can make the bridge
refuse something as fast as it can send it; one WARNING per refusal turned
100,000 unknown vfio-user commands into 10.8 MB of log in 6 s. A
``RateLimitedLog`` lets ``burst`` lines through at once, refills that budget
over ``period`` seconds (a token bucket), counts what it drops, and says how
many lines were dropped on the next line it lets through.

Two shapes of limit, one class:

- time-based (the default): at most ``burst`` lines per ``period`` seconds;
- count-based, as the virtio device has it (the first 20 in full, then every
  1000th): ``burst=20, period=math.inf, every=1000``.

``calls`` counts every call, logged or not, so it can serve as the error
counter callers keep anyway.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable


class RateLimitedLog:
    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 10,
        period: float = 10.0,
        every: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or period <= 0 or every < 0:
            raise ValueError("burst >= 1, period > 0 and every >= 0 are required")
        self.logger = logger
        self.burst = burst
        self.period = period
        self.every = every
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self.calls = 0  # every call, logged or dropped
        self.suppressed = 0  # dropped since the last line that got through
        self.suppressed_total = 0

    def _allow(self) -> bool:
        now = self._clock()
        if not math.isinf(self.period):
            self._tokens = min(float(self.burst),
                               self._tokens + (now - self._last) * self.burst / self.period)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return self.every > 0 and self.calls % self.every == 0

    def log(self, level: int, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log ``msg % args`` at ``level`` if the budget allows; True if it was logged."""
        return self._log(level, msg, args, exc_info, 3)

    def _log(self, level: int, msg: str, args: tuple[object, ...], exc_info: bool,
             stacklevel: int) -> bool:
        self.calls += 1
        if not self.logger.isEnabledFor(level):
            return False
        if not self._allow():
            self.suppressed += 1
            self.suppressed_total += 1
            return False
        if self.suppressed:
            msg = f"{msg} [{self.suppressed} similar lines suppressed]"
            self.suppressed = 0
        # stacklevel: the record names the caller's line, not this module's
        self.logger.log(level, msg, *args, exc_info=exc_info, stacklevel=stacklevel)
        return True

    def warning(self, msg: str, *args: object) -> bool:
        return self._log(logging.WARNING, msg, args, False, 3)

    def info(self, msg: str, *args: object) -> bool:
        return self._log(logging.INFO, msg, args, False, 3)

    def error(self, msg: str, *args: object) -> bool:
        return self._log(logging.ERROR, msg, args, False, 3)

    def exception(self, msg: str, *args: object) -> bool:
        """Like ``Logger.exception``: ERROR with the current traceback."""
        return self._log(logging.ERROR, msg, args, True, 3)


def guest_error_log(logger: logging.Logger) -> RateLimitedLog:
    """One guest device's protocol errors: the first 20 in full, then every 1000th
    (``calls`` is the device's error count). One per device, so that one guest's flood
    does not hide another's first lines."""
    return RateLimitedLog(logger, burst=20, period=math.inf, every=1000)
