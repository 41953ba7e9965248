"""systemd's readiness protocol (sd_notify(3)), spoken directly: one datagram per state.

With ``Type=notify`` systemd sets NOTIFY_SOCKET to a unix datagram socket (a path, or
an abstract name starting with '@') and waits for ``READY=1``. Without NOTIFY_SOCKET
every call does nothing, so the bridge behaves the same outside systemd.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*assignments: str) -> bool:
    """Send ``KEY=value`` lines (``READY=1``, ``STATUS=...``, ``STOPPING=1``); True if sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET %r is neither a path nor an abstract name; not notifying", address)
        return False
    message = "\n".join(assignments).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message, address)
        except OSError as e:
            # The service manager being gone is no reason to stop serving guests.
            log.warning("sd_notify to %s failed: %s", os.environ["NOTIFY_SOCKET"], e.strerror)
            return False
    return True
