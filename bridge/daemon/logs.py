"""Log lines for operators and collectors: text or JSON, each naming its connection.

Which socket and which initiator a line is about is carried in a context variable set
by the service before it starts a transport's task (trio copies the context into every
task started below it), so the protocol code logs as before and each of its lines
still says whose connection it is. ``RateLimited`` keeps a guest that sends thousands
of messages a second from flooding the journal at debug level.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

# (("socket", ...), ("initiator", ...)) of the connection the current task serves.
connection: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "vscsi_connection", default=())

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")


class _ConnectionFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.connection = dict(connection.get())
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ctx = getattr(record, "connection", None)
        if ctx:
            where = " ".join(f"{k}={v}" for k, v in ctx.items())
            first, nl, rest = text.partition("\n")  # keep a traceback below the line
            text = f"{first} [{where}]{nl}{rest}"
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the connection's fields,
    and the traceback as one string (journald and collectors keep it with its line)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(getattr(record, "connection", None) or {})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str, fmt: str = "text") -> None:
    """Send the bridge's logs to stderr (journald takes stderr under systemd)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_ConnectionFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))


class RateLimited:
    """At most ``burst`` lines per ``interval`` seconds; then one line saying how many
    were dropped, once the interval is over."""

    def __init__(self, logger: logging.Logger, burst: int = 50, interval: float = 1.0,
                 clock: object = time.monotonic) -> None:
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._window = -1e18
        self._count = 0
        self._dropped = 0

    def debug(self, msg: str, *args: object) -> None:
        if not self.logger.isEnabledFor(logging.DEBUG):
            return
        now = self._clock()  # type: ignore[operator]
        if now - self._window >= self.interval:
            if self._dropped:
                self.logger.debug("%d more lines like these dropped (rate limit %d per %g s)",
                                  self._dropped, self.burst, self.interval)
            self._window, self._count, self._dropped = now, 0, 0
        if self._count < self.burst:
            self._count += 1
            self.logger.debug(msg, *args)
        else:
            self._dropped += 1
