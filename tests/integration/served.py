"""What most booted tests do: a device served over vfio-user while one guest runs a script."""

from __future__ import annotations

from typing import Any

import trio

from bridge.scsi.target import Target
from bridge.vfio_user.server import serve
from bridge.virtio.scsi_device import VirtioScsiPciDevice
from harness.guest import GuestResult, run_guest


async def run_guest_served(target: Target, device: VirtioScsiPciDevice, sock: str, script: str,
                           **guest: Any) -> GuestResult:
    """``script`` in a guest attached over vfio-user to ``device`` served on ``sock``
    (``guest``: run_guest's options); the server stops with the guest, then ``target``
    is closed, also on failure."""
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, sock, device)
            result = await run_guest(script, attach="vfio-user", socket=sock, **guest)
            nursery.cancel_scope.cancel()
    finally:
        target.close()
    return result
