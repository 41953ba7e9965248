"""What the target core uses of persistent reservations (bridge/target/reservations.py).

``PersistentReservations`` (one per LU) is the implementation; ``NoReservations``
shows the interface: the core only ever calls these five methods.
"""

from __future__ import annotations

from collections.abc import Callable

from bridge.virtio.scsi_request import InitiatorPort

from .reservations import PersistentReservations, ReservationConflict
from .sense import invalid_opcode

__all__ = ["NoReservations", "PersistentReservations", "ReservationConflict"]


class NoReservations:
    """No reservation support: nothing conflicts, every PR/RESERVE opcode is invalid."""

    def __init__(
        self,
        lu_name: str,
        state_path: str | None,
        unit_attention: Callable[[str, int, int], None],
    ) -> None:
        self.lu_name = lu_name

    def conflicts(self, initiator: str, cdb: bytes) -> bool:
        return False

    def handle(
        self, initiator: InitiatorPort, cdb: bytes, data_out: bytes, alloc_len_in: int
    ) -> tuple[bytes, list[str]]:
        raise invalid_opcode()

    def nexus_loss(self, initiator: str) -> None:
        pass

    def logical_unit_reset(self) -> None:
        pass
