"""Reservations of a logical unit: SPC-4 5.13 persistent reservations and SPC-2 RESERVE/RELEASE.

Layout: table.py (which commands a reservation lets through, as data with its
sources), codec.py (PERSISTENT RESERVE IN/OUT parameter data), state.py (the
registrations and reservation, and their APTPL file), pr_out.py and pr_in.py (the
service actions, sans-I/O), persistent_reservations.py (PersistentReservations: one
per LU; current state, conflict checks, SPC-2, committing PR OUTs in order and
durably), commands.py (the dispatch rows for PR IN/OUT and RESERVE/RELEASE(6/10)).
"""

from __future__ import annotations

from .persistent_reservations import (
    PersistentReservations,
    ReservationConflict,
    pr_in_cdb,
    pr_out_cdb,
)
from .state import ReservationStateError, state_path_for
from .table import ReservationType, conflict_table_rows

__all__ = [
    "PersistentReservations",
    "ReservationConflict",
    "ReservationStateError",
    "ReservationType",
    "conflict_table_rows",
    "pr_in_cdb",
    "pr_out_cdb",
    "state_path_for",
]
