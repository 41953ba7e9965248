"""Stand-in for persistent reservations until bridge/target/reservations.py exists.

The real ``PersistentReservations`` (one per LU) has the same interface; the core
only ever calls these five methods.
"""

from __future__ import annotations

from collections.abc import Callable

from bridge.virtio.scsi_request import InitiatorPort

from .sense import invalid_opcode


class ReservationConflict(Exception):
    """Raised by handle(): the command ends in RESERVATION CONFLICT."""


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


# TODO(reservations): temporary fallback until bridge/target/reservations.py lands;
# the reservations engineer deletes this try/except and imports it directly.
try:
    from .reservations import (  # type: ignore[assignment]  # noqa: F401, F811
        PersistentReservations,
        ReservationConflict,
    )
except ImportError:  # pragma: no cover - depends on the other engineer's file
    PersistentReservations = NoReservations  # type: ignore[misc,assignment]
