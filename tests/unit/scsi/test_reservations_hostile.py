"""Guest-controlled CDBs and parameter lists: only SCSI errors come out, never a crash."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.scsi.reservations import ReservationType, conflict_table_rows
from bridge.scsi.reservations.table import SPC2_ALLOWED_FROM_OTHERS, command_key

from .test_reservations_helpers import KEY_A, KEY_B, A, B, ReservationConflict, SenseError, make

OPCODES = st.sampled_from([0x5E, 0x5F, 0x16, 0x17, 0x56, 0x57])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    op=OPCODES,
    cdb_tail=st.binary(min_size=0, max_size=15),
    data=st.binary(min_size=0, max_size=120),
    alloc=st.integers(min_value=-5, max_value=1 << 20),
    holder=st.booleans(),
)
def test_handle_only_raises_scsi_errors(op, cdb_tail, data, alloc, holder):
    h = make()
    h.register(A, KEY_A)
    h.register(B, KEY_B)
    if holder:
        h.reserve(A, KEY_A, ReservationType.WRITE_EXCLUSIVE)
    cdb = bytes([op]) + cdb_tail
    try:
        out, aborts = h.handle(B, cdb, data, alloc)
    except (SenseError, ReservationConflict):
        return
    assert isinstance(out, bytes) and len(out) <= max(alloc, 0)
    assert all(isinstance(a, str) for a in aborts)


@settings(max_examples=300, deadline=None)
@given(cdb=st.binary(min_size=0, max_size=32))
def test_conflicts_never_raises(cdb):
    h = make()
    h.register(A, KEY_A)
    h.reserve(A, KEY_A, ReservationType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY)
    assert h.pr.conflicts("iqn.2026-11.org.test:x", cdb) in (True, False)


@settings(max_examples=200, deadline=None)
@given(
    length=st.integers(min_value=24, max_value=400),
    tail=st.binary(min_size=0, max_size=400),
    tpdl=st.integers(min_value=0, max_value=0xFFFFFFFF),
)
def test_spec_i_pt_lists_never_crash(length, tail, tpdl):
    h = make()
    data = (struct.pack(">QQIBBHI", 0, KEY_A, 0, 0x08, 0, 0, tpdl) + tail)[:length]
    cdb = bytes([0x5F, 0, 0, 0, 0]) + struct.pack(">I", length) + b"\0"
    try:
        h.handle(A, cdb, data, 0)
    except (SenseError, ReservationConflict):
        assert h.keys() == (0, [])


def test_data_out_as_list_of_memoryviews():
    h = make()
    raw = struct.pack(">QQIBBH", 0, KEY_A, 0, 0, 0, 0)
    bufs = [memoryview(raw[:10]), memoryview(raw[10:])]
    cdb = bytes([0x5F, 0, 0, 0, 0]) + struct.pack(">I", 24) + b"\0"
    h.handle(A, cdb, bufs, 0)
    assert h.keys() == (1, [KEY_A])


def test_allow_commands_011b_is_what_the_table_does():
    """REPORT CAPABILITIES says ALLOW COMMANDS = 011b (SPC-4 6.15.4); the table must agree."""
    rows = {r.command: r for r in conflict_table_rows()}
    we, ea = ReservationType.WRITE_EXCLUSIVE, ReservationType.EXCLUSIVE_ACCESS
    tur = rows["TEST UNIT READY"]
    assert all(tur.allows(t, reg) for t in (we, ea) for reg in (True, False))
    for name in (
        "MODE SENSE(6)",
        "MODE SENSE(10)",
        "READ ATTRIBUTE",
        "READ BUFFER",
        "RECEIVE COPY RESULTS",
        "RECEIVE DIAGNOSTIC RESULTS",
        "REPORT SUPPORTED OPERATION CODES",
        "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS",
        "READ DEFECT DATA(10)",
        "READ DEFECT DATA(12)",
    ):
        assert rows[name].allows(we, False), name


def test_spc2_allowed_list_uses_real_command_keys():
    assert (0x12, None, None) in SPC2_ALLOWED_FROM_OTHERS
    assert command_key(bytes([0x1E, 0, 0, 0, 0, 0])) in SPC2_ALLOWED_FROM_OTHERS
    assert command_key(bytes([0x1E, 0, 0, 0, 1, 0])) not in SPC2_ALLOWED_FROM_OTHERS
