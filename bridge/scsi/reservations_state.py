"""Old import path, kept for bridge/cli.py until it imports from bridge.scsi.reservations."""

from bridge.scsi.reservations.state import ReservationStateError

__all__ = ["ReservationStateError"]
