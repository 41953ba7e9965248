"""SPC-2 RESERVE/RELEASE(6/10) and their interplay with persistent reservations (CRH=1)."""

from __future__ import annotations

import pytest

from bridge.scsi.reservations import ReservationType, pr_in_cdb, pr_out_cdb

from .test_reservations_helpers import (
    KEY_A,
    KEY_B,
    READ_KEYS,
    A,
    B,
    C,
    ReservationConflict,
    SenseError,
    field_pointer,
    make,
)

T = ReservationType
RESERVE6 = bytes([0x16, 0, 0, 0, 0, 0])
RELEASE6 = bytes([0x17, 0, 0, 0, 0, 0])
RESERVE10 = bytes([0x56] + [0] * 9)
RELEASE10 = bytes([0x57] + [0] * 9)
WRITE10 = bytes([0x2A] + [0] * 9)
READ10 = bytes([0x28] + [0] * 9)
INQUIRY = bytes([0x12, 0, 0, 0, 36, 0])
TUR = bytes(6)


def run(h, ini, cdb):
    if h.pr.conflicts(ini.name, cdb):
        raise ReservationConflict("conflicts()")
    return h.handle(ini, cdb, b"", 0)


@pytest.mark.parametrize("reserve,release", [(RESERVE6, RELEASE6), (RESERVE10, RELEASE10)])
def test_reserve_release_cycle(reserve, release):
    h = make()
    run(h, A, reserve)
    assert h.pr.status()["spc2_holder"] == A.name
    assert h.pr.conflicts(A.name, WRITE10) is False
    assert h.pr.conflicts(B.name, WRITE10) is True
    assert h.pr.conflicts(B.name, READ10) is True
    assert h.pr.conflicts(B.name, TUR) is True
    assert h.pr.conflicts(B.name, INQUIRY) is False
    with pytest.raises(ReservationConflict):
        run(h, B, reserve)
    run(h, B, release)  # non-holder RELEASE: GOOD, no effect
    assert h.pr.status()["spc2_holder"] == A.name
    run(h, A, reserve)  # the holder may reserve again
    run(h, A, release)
    assert h.pr.status()["spc2_holder"] is None
    assert h.pr.conflicts(B.name, WRITE10) is False


def test_pr_commands_conflict_while_spc2_reserved_even_for_the_holder():
    h = make()
    run(h, A, RESERVE6)
    for ini in (A, B):
        assert h.pr.conflicts(ini.name, pr_in_cdb(READ_KEYS)) is True
        assert h.pr.conflicts(ini.name, pr_out_cdb(0)) is True
        with pytest.raises(ReservationConflict):
            h.handle(ini, pr_in_cdb(READ_KEYS), b"", 100)


def test_nexus_loss_and_lu_reset_release_spc2_but_not_pr():
    h = make()
    run(h, A, RESERVE6)
    h.pr.nexus_loss(B.name)
    assert h.pr.status()["spc2_holder"] == A.name
    h.pr.nexus_loss(A.name)
    assert h.pr.status()["spc2_holder"] is None
    run(h, B, RESERVE10)
    h.pr.logical_unit_reset()
    assert h.pr.status()["spc2_holder"] is None
    # Persistent reservations survive both.
    h.register(A, KEY_A)
    h.reserve(A, KEY_A, T.EXCLUSIVE_ACCESS)
    h.pr.nexus_loss(A.name)
    h.pr.logical_unit_reset()
    assert h.reservation() == (KEY_A, 0, T.EXCLUSIVE_ACCESS)
    assert h.pr.conflicts(B.name, READ10) is True


def test_reserve_release_conflict_once_registrations_exist():
    h = make()
    h.register(A, KEY_A)
    for ini in (A, B):  # registered without reservation, or unregistered
        for cdb in (RESERVE6, RELEASE6, RESERVE10, RELEASE10):
            assert h.pr.conflicts(ini.name, cdb) is True
            with pytest.raises(ReservationConflict):
                h.handle(ini, cdb, b"", 0)


def test_crh_holder_reserve_and_release_are_good_no_ops():
    h = make()
    h.register(A, KEY_A)
    h.register(B, KEY_B)
    h.reserve(A, KEY_A, T.WRITE_EXCLUSIVE)
    for cdb in (RESERVE6, RESERVE10, RELEASE6, RELEASE10):
        run(h, A, cdb)
    assert h.reservation() == (KEY_A, 0, T.WRITE_EXCLUSIVE)
    assert h.pr.status()["spc2_holder"] is None
    with pytest.raises(ReservationConflict):  # registered non-holder under WE
        run(h, B, RESERVE6)
    with pytest.raises(ReservationConflict):  # not registered
        run(h, C, RELEASE6)


@pytest.mark.parametrize(
    "rtype", [T.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, T.EXCLUSIVE_ACCESS_ALL_REGISTRANTS]
)
def test_crh_registrant_under_registrants_types_gets_good(rtype):
    h = make()
    h.register(A, KEY_A)
    h.register(B, KEY_B)
    h.reserve(A, KEY_A, rtype)
    run(h, B, RESERVE6)
    run(h, B, RELEASE10)
    assert h.reservation()[2] == rtype
    assert h.pr.status()["spc2_holder"] is None
    with pytest.raises(ReservationConflict):
        run(h, C, RESERVE6)


@pytest.mark.parametrize(
    "cdb,pointer",
    [
        (bytes([0x56, 0x10] + [0] * 8), (True, 1, 4)),  # RESERVE(10) 3RDPTY
        (bytes([0x56, 0x02] + [0] * 8), (True, 1, 1)),  # RESERVE(10) LONGID
        (bytes([0x16, 0x01, 0, 0, 0, 0]), (True, 1, 0)),  # RESERVE(6) extent
        (bytes([0x57, 0x10] + [0] * 8), (True, 1, 4)),  # RELEASE(10) 3RDPTY
    ],
)
def test_unsupported_reserve_forms(cdb, pointer):
    h = make()
    with pytest.raises(SenseError) as e:
        h.handle(A, cdb, b"", 0)
    assert field_pointer(e) == pointer
    assert h.pr.status()["spc2_holder"] is None


def test_unhandled_opcode_is_invalid():
    h = make()
    with pytest.raises(SenseError) as e:
        h.handle(A, READ10, b"", 0)
    assert e.value.sense.asc == 0x20
