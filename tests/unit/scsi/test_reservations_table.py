"""The conflict table (SPC-4 5.13.1, SBC-3 4.17), checked row by row through conflicts()."""

from __future__ import annotations

import pytest

from bridge.scsi.reservations import ReservationType, conflict_table_rows
from bridge.scsi.reservations.table import DEFAULT_ROW, command_key, conflict_row

from .test_reservations_helpers import KEY_A, KEY_B, A, B, C, make

ROWS = conflict_table_rows()
ROLES = ("holder", "registered", "not-registered")


def _reserved(rtype: ReservationType):
    """A holds an rtype reservation, B is registered, C is not."""
    h = make()
    h.register(A, KEY_A)
    h.register(B, KEY_B)
    h.reserve(A, KEY_A, int(rtype))
    return h


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("rtype", list(ReservationType), ids=lambda t: t.short_name)
@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.command)
def test_conflict_table_cell(row, rtype, role):
    h = _reserved(rtype)
    ini = {"holder": A, "registered": B, "not-registered": C}[role]
    cdb = row.example_cdb()
    assert conflict_row(cdb) is row  # the example CDB really selects this row
    if role == "holder" or (role == "registered" and rtype.all_registrants):
        expected_conflict = False  # holders (every registrant under *AR) run everything
    else:
        expected_conflict = not row.allows(rtype, role == "registered")
    assert h.pr.conflicts(ini.name, cdb) is expected_conflict


def test_no_reservation_means_no_conflict_for_any_row():
    h = make()
    h.register(A, KEY_A)
    for row in ROWS:
        assert h.pr.conflicts(C.name, row.example_cdb()) is False


# Independent spot checks, written from the standard's text rather than the table.
READ10 = bytes([0x28] + [0] * 9)
WRITE10 = bytes([0x2A] + [0] * 9)
INQUIRY = bytes([0x12, 0, 0, 0, 36, 0])
MODE_SELECT6 = bytes([0x15, 0x10, 0, 0, 24, 0])
MODE_SENSE6 = bytes([0x1A, 0, 0x3F, 0, 0xFF, 0])
TUR = bytes(6)
SYNC_CACHE10 = bytes([0x35] + [0] * 9)
READ_CAP16 = bytes([0x9E, 0x10] + [0] * 14)


@pytest.mark.parametrize(
    "rtype,ini,cdb,conflict",
    [
        # Write Exclusive: reads from anyone, writes only from the holder.
        (ReservationType.WRITE_EXCLUSIVE, C, READ10, False),
        (ReservationType.WRITE_EXCLUSIVE, B, WRITE10, True),
        (ReservationType.WRITE_EXCLUSIVE, C, MODE_SELECT6, True),
        (ReservationType.WRITE_EXCLUSIVE, C, MODE_SENSE6, False),
        # Exclusive Access: even reads conflict, but INQUIRY/TUR/READ CAPACITY pass.
        (ReservationType.EXCLUSIVE_ACCESS, B, READ10, True),
        (ReservationType.EXCLUSIVE_ACCESS, C, INQUIRY, False),
        (ReservationType.EXCLUSIVE_ACCESS, C, TUR, False),
        (ReservationType.EXCLUSIVE_ACCESS, C, READ_CAP16, False),
        (ReservationType.EXCLUSIVE_ACCESS, C, MODE_SENSE6, True),
        # Registrants Only: registrants write, others are fenced.
        (ReservationType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, B, WRITE10, False),
        (ReservationType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, C, WRITE10, True),
        (ReservationType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, C, READ10, False),
        (ReservationType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, C, SYNC_CACHE10, True),
        (ReservationType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY, C, READ10, True),
        (ReservationType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY, B, READ10, False),
        # All Registrants: every registrant is a holder.
        (ReservationType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS, B, WRITE10, False),
        (ReservationType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS, C, READ10, True),
        (ReservationType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, C, READ10, False),
        (ReservationType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, C, WRITE10, True),
    ],
)
def test_spot_checks(rtype, ini, cdb, conflict):
    h = _reserved(rtype)
    assert h.pr.conflicts(ini.name, cdb) is conflict


def test_start_stop_unit_variants():
    h = _reserved(ReservationType.EXCLUSIVE_ACCESS)
    start = bytes([0x1B, 0, 0, 0, 0x01, 0])
    stop = bytes([0x1B, 0, 0, 0, 0x00, 0])
    start_with_power_condition = bytes([0x1B, 0, 0, 0, 0x31, 0])
    assert h.pr.conflicts(C.name, start) is False
    assert h.pr.conflicts(C.name, stop) is True
    assert h.pr.conflicts(C.name, start_with_power_condition) is True


def test_pr_out_rows_by_service_action():
    h = _reserved(ReservationType.WRITE_EXCLUSIVE)
    prout = lambda sa: bytes([0x5F, sa] + [0] * 8)  # noqa: E731
    assert h.pr.conflicts(C.name, prout(0x00)) is False  # REGISTER: anyone
    assert h.pr.conflicts(C.name, prout(0x06)) is False  # REGISTER AND IGNORE: anyone
    assert h.pr.conflicts(B.name, prout(0x04)) is False  # PREEMPT: registered
    assert h.pr.conflicts(C.name, prout(0x04)) is True  # PREEMPT: not registered
    assert h.pr.conflicts(B.name, prout(0x01)) is True  # RESERVE: non-holder
    assert h.pr.conflicts(B.name, prout(0x07)) is True  # REGISTER AND MOVE: non-holder
    assert h.pr.conflicts(A.name, prout(0x07)) is False  # ... holder may


def test_unknown_commands_get_the_most_restrictive_row():
    h = _reserved(ReservationType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    vendor = bytes([0xC0] + [0] * 9)
    assert conflict_row(vendor) is DEFAULT_ROW
    assert h.pr.conflicts(C.name, vendor) is True
    assert h.pr.conflicts(B.name, vendor) is False
    # An unknown service action of a known opcode falls back to the opcode row when
    # one exists without a service action, else to the default.
    assert conflict_row(bytes([0xA3, 0x1F] + [0] * 10)) is DEFAULT_ROW


def test_command_key_reads_service_actions():
    assert command_key(bytes([0x9E, 0x10] + [0] * 14)) == (0x9E, 0x10, None)
    cdb32 = bytearray(32)
    cdb32[0], cdb32[7], cdb32[9] = 0x7F, 0x18, 0x0B
    assert command_key(bytes(cdb32)) == (0x7F, 0x0B, None)
    assert command_key(bytes([0x28])) == (0x28, None, None)  # short CDB does not crash


def test_table_rows_are_unique_and_cover_all_types():
    keys = [r.key for r in ROWS]
    assert len(keys) == len(set(keys))
    for r in ROWS:
        assert set(r.allowed) == {(t, reg) for t in ReservationType for reg in (True, False)}
        assert r.source
