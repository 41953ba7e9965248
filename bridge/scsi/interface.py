"""The one declared set of calls a transport makes into the target core.

Like Linux's target_core_fabric_ops or QEMU's SCSIBusInfo, but in the other direction:
every transport (bridge/virtio, bridge/xen) and every test double uses exactly this,
and bridge.scsi.target.Target implements it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from .events import TargetEvent
from .request import ScsiRequest, ScsiResponse, TmfRequest, TmfResponse


class ScsiTarget(Protocol):
    def submit(self, req: ScsiRequest) -> ScsiResponse | Awaitable[ScsiResponse]:
        """Start a command without blocking: its response when it completed at once, else
        an awaitable that finishes it (the transport must await it). Never raises."""
        ...

    async def task_management(self, tmf: TmfRequest) -> TmfResponse:
        """Run a task management function (SAM-5 7); never raises."""
        ...

    def nexus_loss(self, initiator: str) -> None:
        """SAM-5 6.3.4: the initiator port is gone or was reset."""
        ...

    def luns_for(self, initiator: str) -> list[int]:
        """The LUNs this initiator sees, ascending."""
        ...

    def subscribe(self, callback: Callable[[TargetEvent], None]) -> None:
        """Deliver LUN hot-plug and capacity events to ``callback``."""
        ...

    def unsubscribe(self, callback: Callable[[TargetEvent], None]) -> None:
        ...
