"""Events the target core reports to transports (virtio eventq, Xen Reconfiguring)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LunAdded:
    """SAM-5: REPORTED LUNS DATA HAS CHANGED for this initiator; virtio TRANSPORT_RESET RESCAN."""

    initiator: str
    lun: int


@dataclass(frozen=True)
class LunRemoved:
    """virtio TRANSPORT_RESET REMOVED; Xen vscsi-devs/dev-N state 5."""

    initiator: str
    lun: int


@dataclass(frozen=True)
class CapacityChanged:
    """SBC-3: CAPACITY DATA HAS CHANGED (2Ah/09h); virtio PARAM_CHANGE."""

    initiator: str
    lun: int


TargetEvent = LunAdded | LunRemoved | CapacityChanged
