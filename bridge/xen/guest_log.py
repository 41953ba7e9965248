"""Log lines a guest can cause, rate-limited: a hostile frontend must not flood the log.

The first IN_FULL in full, then every EVERY-th, each with its running count (the
policy of the virtio device's _warn_guest, bridge/virtio/scsi_device.py). One
counter per vscsi device, so one guest's flood does not hide another's first lines.
"""

from __future__ import annotations

import logging

IN_FULL = 20
EVERY = 1000


class GuestLog:
    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.count = 0  # guest-caused events so far, logged or not

    def warning(self, fmt: str, *args: object) -> None:
        self.log(logging.WARNING, fmt, *args)

    def error(self, fmt: str, *args: object) -> None:
        self.log(logging.ERROR, fmt, *args)

    def log(self, level: int, fmt: str, *args: object) -> None:
        self.count += 1
        n = self.count
        if n <= IN_FULL or n % EVERY == 0:
            self.logger.log(level, fmt + " [guest error %d]", *args, n)
