"""PERSISTENT RESERVE OUT: every service action, every type, the error paths (SPC-4 5.13, 6.16)."""

from __future__ import annotations

import struct

import pytest

from bridge.scsi.reservations import ReservationType, pr_out_cdb
from bridge.scsi.reservations.codec import encode_iscsi_transport_id

from .test_reservations_helpers import (
    CLEAR,
    KEY_A,
    KEY_B,
    KEY_C,
    KEY_D,
    PREEMPT,
    PREEMPT_AND_ABORT,
    REGISTER,
    REGISTER_AND_MOVE,
    REGISTER_IGNORE,
    RELEASE,
    RESERVE,
    A,
    B,
    C,
    D,
    ReservationConflict,
    SenseError,
    expect_sense,
    field_pointer,
    make,
    params,
    ram_params,
)

T = ReservationType
PREEMPTED, RELEASED, REG_PREEMPTED = 0x03, 0x04, 0x05
ILLEGAL = 0x5


def three_registered():
    h = make()
    h.register(A, KEY_A)
    h.register(B, KEY_B)
    h.register(C, KEY_C)
    return h


# ------------------------------------------------------------------ REGISTER


def test_register_adds_keys_and_bumps_generation():
    h = make()
    assert h.keys() == (0, [])
    h.register(A, KEY_A)
    h.register(B, KEY_B)
    assert h.keys() == (2, [KEY_A, KEY_B])


def test_register_from_unregistered_with_nonzero_reservation_key_conflicts():
    h = make()
    with pytest.raises(ReservationConflict):
        h.out(A, REGISTER, 0x99, KEY_A)
    assert h.keys() == (0, [])


def test_register_changes_key_only_with_matching_key():
    h = make()
    h.register(A, KEY_A)
    with pytest.raises(ReservationConflict):
        h.out(A, REGISTER, 0x1234, 0x77)
    h.out(A, REGISTER, KEY_A, 0x77)
    assert h.keys() == (2, [0x77])


def test_register_with_zero_keys_from_unregistered_is_a_no_op():
    h = make()
    h.out(A, REGISTER, 0, 0)
    assert h.keys()[1] == []


def test_register_and_ignore_existing_key():
    h = make()
    h.out(A, REGISTER_IGNORE, 0xDEAD, KEY_A)  # reservation key ignored
    h.out(A, REGISTER_IGNORE, 0xBEEF, KEY_B)
    assert h.keys() == (2, [KEY_B])
    h.out(A, REGISTER_IGNORE, 0, 0)  # unregister
    assert h.keys() == (3, [])


def test_unregister_of_write_exclusive_holder_releases_without_ua():
    h = make()
    h.register(A, KEY_A)
    h.register(B, KEY_B)
    h.reserve(A, KEY_A, T.WRITE_EXCLUSIVE)
    h.out(A, REGISTER, KEY_A, 0)
    assert h.reservation() is None
    assert h.take_uas() == []


def test_unregister_of_registrants_only_holder_releases_with_ua():
    h = three_registered()
    h.reserve(A, KEY_A, T.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    h.out(A, REGISTER, KEY_A, 0)
    assert h.reservation() is None
    assert sorted(h.take_uas()) == [(B.name, 0x2A, RELEASED), (C.name, 0x2A, RELEASED)]


def test_all_registrants_reservation_survives_until_last_registrant_leaves():
    h = make()
    h.register(A, KEY_A)
    h.register(B, KEY_B)
    h.reserve(A, KEY_A, T.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)
    h.out(A, REGISTER, KEY_A, 0)
    assert h.reservation() == (0, 0, T.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)
    assert h.pr.conflicts(B.name, bytes([0x2A] + [0] * 9)) is False
    h.out(B, REGISTER, KEY_B, 0)
    assert h.reservation() is None


# ------------------------------------------------------------------- RESERVE


@pytest.mark.parametrize("rtype", list(T), ids=lambda t: t.short_name)
def test_reserve_each_type(rtype):
    h = make()
    h.register(A, KEY_A)
    gen = h.generation()
    h.reserve(A, KEY_A, rtype)
    expected_key = 0 if rtype.all_registrants else KEY_A  # SPC-4 6.15.3.2
    assert h.reservation() == (expected_key, 0, rtype)
    assert h.generation() == gen  # RESERVE does not bump PRGENERATION
    # Same reservation again from the holder: GOOD, nothing changes.
    h.reserve(A, KEY_A, rtype)
    assert h.reservation() == (expected_key, 0, rtype)
    assert h.pr.status()["type"] == rtype.short_name


def test_reserve_conflicts():
    h = make()
    h.register(A, KEY_A)
    h.register(B, KEY_B)
    with pytest.raises(ReservationConflict):
        h.reserve(C, 0, T.WRITE_EXCLUSIVE)  # not registered
    with pytest.raises(ReservationConflict):
        h.reserve(A, KEY_B, T.WRITE_EXCLUSIVE)  # key mismatch
    h.reserve(A, KEY_A, T.WRITE_EXCLUSIVE)
    with pytest.raises(ReservationConflict):
        h.reserve(A, KEY_A, T.EXCLUSIVE_ACCESS)  # holder, different type
    with pytest.raises(ReservationConflict):
        h.reserve(B, KEY_B, T.WRITE_EXCLUSIVE)  # not the holder


def test_reserve_all_registrants_from_another_registrant_is_good():
    h = make()
    h.register(A, KEY_A)
    h.register(B, KEY_B)
    h.reserve(A, KEY_A, T.WRITE_EXCLUSIVE_ALL_REGISTRANTS)
    h.reserve(B, KEY_B, T.WRITE_EXCLUSIVE_ALL_REGISTRANTS)
    with pytest.raises(ReservationConflict):
        h.reserve(B, KEY_B, T.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)


@pytest.mark.parametrize("bad_type", [0, 2, 4, 9, 0xF])
def test_reserve_invalid_type(bad_type):
    h = make()
    h.register(A, KEY_A)
    with pytest.raises(SenseError) as e:
        h.reserve(A, KEY_A, bad_type)
    expect_sense(e, ILLEGAL, 0x24, 0)
    assert field_pointer(e) == (True, 2, 3)


def test_reserve_invalid_scope():
    h = make()
    h.register(A, KEY_A)
    with pytest.raises(SenseError) as e:
        h.out(A, RESERVE, KEY_A, 0, T.WRITE_EXCLUSIVE, scope=1)
    expect_sense(e, ILLEGAL, 0x24, 0)
    assert field_pointer(e) == (True, 2, 7)


# ------------------------------------------------------------------- RELEASE


@pytest.mark.parametrize("rtype", list(T), ids=lambda t: t.short_name)
def test_release_each_type(rtype):
    h = three_registered()
    h.reserve(A, KEY_A, rtype)
    gen = h.generation()
    h.out(A, RELEASE, KEY_A, 0, rtype)
    assert h.reservation() is None
    assert h.generation() == gen
    uas = sorted(h.take_uas())
    if rtype.registrants_only or rtype.all_registrants:
        assert uas == [(B.name, 0x2A, RELEASED), (C.name, 0x2A, RELEASED)]
    else:
        assert uas == []


def test_release_by_non_holder_is_good_without_effect():
    h = three_registered()
    h.reserve(A, KEY_A, T.EXCLUSIVE_ACCESS)
    h.out(B, RELEASE, KEY_B, 0, T.EXCLUSIVE_ACCESS)
    assert h.reservation() == (KEY_A, 0, T.EXCLUSIVE_ACCESS)


def test_release_without_reservation_is_good():
    h = three_registered()
    h.out(A, RELEASE, KEY_A, 0, T.EXCLUSIVE_ACCESS)
    assert h.reservation() is None


def test_release_with_wrong_type_is_invalid_release():
    h = three_registered()
    h.reserve(A, KEY_A, T.WRITE_EXCLUSIVE)
    with pytest.raises(SenseError) as e:
        h.out(A, RELEASE, KEY_A, 0, T.EXCLUSIVE_ACCESS)
    expect_sense(e, ILLEGAL, 0x26, 0x04)
    assert h.reservation() == (KEY_A, 0, T.WRITE_EXCLUSIVE)


def test_release_conflicts_when_unregistered_or_key_mismatch():
    h = three_registered()
    h.reserve(A, KEY_A, T.WRITE_EXCLUSIVE)
    with pytest.raises(ReservationConflict):
        h.out(D, RELEASE, 0, 0, T.WRITE_EXCLUSIVE)
    with pytest.raises(ReservationConflict):
        h.out(A, RELEASE, KEY_B, 0, T.WRITE_EXCLUSIVE)
    assert h.reservation() is not None


# --------------------------------------------------------------------- CLEAR


def test_clear_removes_everything_and_notifies_others():
    h = three_registered()
    h.reserve(B, KEY_B, T.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY)
    gen = h.generation()
    h.out(A, CLEAR, KEY_A)
    assert h.keys() == (gen + 1, [])
    assert h.reservation() is None
    assert sorted(h.take_uas()) == [(B.name, 0x2A, PREEMPTED), (C.name, 0x2A, PREEMPTED)]


def test_clear_needs_a_registered_key():
    h = three_registered()
    with pytest.raises(ReservationConflict):
        h.out(D, CLEAR, 0)
    with pytest.raises(ReservationConflict):
        h.out(A, CLEAR, KEY_B)
    assert len(h.keys()[1]) == 3


# ------------------------------------------------------------------- PREEMPT


def test_preempt_without_reservation_removes_registrations():
    h = three_registered()
    gen = h.generation()
    h.out(A, PREEMPT, KEY_A, KEY_B)
    assert h.keys() == (gen + 1, [KEY_A, KEY_C])
    assert h.take_uas() == [(B.name, 0x2A, REG_PREEMPTED)]
    assert h.reservation() is None


def test_preempt_zero_key_without_reservation_is_invalid():
    h = three_registered()
    with pytest.raises(SenseError) as e:
        h.out(A, PREEMPT, KEY_A, 0)
    expect_sense(e, ILLEGAL, 0x26, 0)
    assert field_pointer(e) == (False, 8, None)


def test_preempt_unknown_key_conflicts():
    h = three_registered()
    with pytest.raises(ReservationConflict):
        h.out(A, PREEMPT, KEY_A, 0x5555)
    with pytest.raises(ReservationConflict):
        h.out(D, PREEMPT, 0, KEY_B)  # requester not registered


@pytest.mark.parametrize("new_type", [T.WRITE_EXCLUSIVE, T.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY])
def test_preempt_the_holder_takes_the_reservation(new_type):
    h = three_registered()
    h.reserve(B, KEY_B, T.WRITE_EXCLUSIVE)
    h.out(A, PREEMPT, KEY_A, KEY_B, new_type)
    assert h.reservation() == (KEY_A, 0, new_type)
    assert h.keys()[1] == [KEY_A, KEY_C]
    uas = sorted(h.take_uas())
    expected = [(B.name, 0x2A, REG_PREEMPTED)]
    if new_type != T.WRITE_EXCLUSIVE:  # type changed: the survivors are told
        expected.append((C.name, 0x2A, RELEASED))
    assert uas == sorted(expected)


def test_preempt_non_holder_key_leaves_reservation():
    h = three_registered()
    h.reserve(B, KEY_B, T.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    h.out(A, PREEMPT, KEY_A, KEY_C, T.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    assert h.reservation() == (KEY_B, 0, T.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    assert h.keys()[1] == [KEY_A, KEY_B]
    assert h.take_uas() == [(C.name, 0x2A, REG_PREEMPTED)]


def test_preempt_own_key_without_reservation_removes_the_caller_too():
    """SPC-4 5.13.11.4.4: removing registrations spares nobody (fence_scsi re-registers)."""
    h = make()
    h.register(A, KEY_A)
    h.register(B, KEY_A)  # same key on two nexuses (a stale path)
    h.register(C, KEY_C)
    h.out(A, PREEMPT, KEY_A, KEY_A)
    assert h.keys()[1] == [KEY_C]
    assert h.take_uas() == [(B.name, 0x2A, REG_PREEMPTED)]  # not to the caller


def test_preempt_own_key_while_holding_keeps_the_caller():
    """SPC-4 5.13.11.4.3: preempting the reservation removes the key's others, not the caller."""
    h = make()
    h.register(A, KEY_A)
    h.register(B, KEY_A)
    h.register(C, KEY_C)
    h.reserve(A, KEY_A, T.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    aborts = h.out(A, PREEMPT_AND_ABORT, KEY_A, KEY_A, T.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    assert aborts == [B.name]
    assert h.keys()[1] == [KEY_A, KEY_C]
    assert h.pr.status()["registrants"][0]["initiator"] == A.name
    assert h.reservation() == (KEY_A, 0, T.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    assert h.take_uas() == [(B.name, 0x2A, REG_PREEMPTED)]  # same type: no RELEASED


def test_preempt_all_registrants_removing_the_last_other_keeps_reservation():
    h = make()
    h.register(A, KEY_A)
    h.register(B, KEY_B)
    h.reserve(A, KEY_A, T.WRITE_EXCLUSIVE_ALL_REGISTRANTS)
    h.out(A, PREEMPT, KEY_A, KEY_A, 0)  # own key: removes the caller, B keeps it alive
    assert h.keys()[1] == [KEY_B]
    assert h.reservation() == (0, 0, T.WRITE_EXCLUSIVE_ALL_REGISTRANTS)
    h.out(B, PREEMPT, KEY_B, KEY_B, 0)  # the last registrant goes: reservation goes
    assert h.reservation() is None


def test_preempt_all_registrants_with_zero_key():
    h = three_registered()
    h.reserve(B, KEY_B, T.WRITE_EXCLUSIVE_ALL_REGISTRANTS)
    h.out(A, PREEMPT, KEY_A, 0, T.EXCLUSIVE_ACCESS)
    assert h.keys()[1] == [KEY_A]
    assert h.reservation() == (KEY_A, 0, T.EXCLUSIVE_ACCESS)
    assert sorted(h.take_uas()) == [(B.name, 0x2A, REG_PREEMPTED), (C.name, 0x2A, REG_PREEMPTED)]


def test_preempt_all_registrants_with_key_removes_only_that_key():
    h = three_registered()
    h.reserve(B, KEY_B, T.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)
    h.out(A, PREEMPT, KEY_A, KEY_C, T.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)
    assert h.keys()[1] == [KEY_A, KEY_B]
    assert h.reservation() == (0, 0, T.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)


def test_preempt_zero_key_with_non_all_registrants_reservation_is_invalid():
    h = three_registered()
    h.reserve(B, KEY_B, T.WRITE_EXCLUSIVE)
    with pytest.raises(SenseError) as e:
        h.out(A, PREEMPT, KEY_A, 0, T.WRITE_EXCLUSIVE)
    expect_sense(e, ILLEGAL, 0x26, 0)


def test_preempt_and_abort_returns_the_fenced_nexuses():
    """fence_scsi: all register, one reserves WERO, a survivor fences the third."""
    h = three_registered()
    h.reserve(A, KEY_A, T.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    write10 = bytes([0x2A] + [0] * 9)
    assert h.pr.conflicts(C.name, write10) is False
    aborts = h.out(B, PREEMPT_AND_ABORT, KEY_B, KEY_C, T.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    assert aborts == [C.name]
    assert h.pr.conflicts(C.name, write10) is True
    assert h.pr.conflicts(C.name, bytes([0x28] + [0] * 9)) is False  # reads still allowed
    assert h.pr.conflicts(B.name, write10) is False
    assert h.take_uas() == [(C.name, 0x2A, REG_PREEMPTED)]


def test_preempt_without_and_abort_aborts_nothing():
    h = three_registered()
    assert h.out(A, PREEMPT, KEY_A, KEY_B) == []


# --------------------------------------------------------- REGISTER AND MOVE


def _move(h, ini, data, rtype=0):
    return h.handle(ini, pr_out_cdb(REGISTER_AND_MOVE, rtype, len(data)), data, 0)


def test_register_and_move_to_unregistered_nexus():
    h = make()
    h.register(A, KEY_A)
    h.reserve(A, KEY_A, T.EXCLUSIVE_ACCESS)
    gen = h.generation()
    _move(h, A, ram_params(KEY_A, KEY_D, D.name))
    assert h.reservation() == (KEY_D, 0, T.EXCLUSIVE_ACCESS)
    assert h.keys() == (gen + 1, [KEY_A, KEY_D])
    assert h.pr.status()["holder"] == D.name


def test_register_and_move_with_unreg_to_registered_nexus():
    h = make()
    h.register(A, KEY_A)
    h.register(B, KEY_B)
    h.reserve(A, KEY_A, T.WRITE_EXCLUSIVE)
    _move(h, A, ram_params(KEY_A, 0x4242, B.name, unreg=True))
    assert h.keys()[1] == [0x4242]
    assert h.reservation() == (0x4242, 0, T.WRITE_EXCLUSIVE)


def test_register_and_move_errors():
    h = make()
    h.register(A, KEY_A)
    h.register(B, KEY_B)
    with pytest.raises(ReservationConflict):  # no reservation
        _move(h, A, ram_params(KEY_A, KEY_D, D.name))
    h.reserve(A, KEY_A, T.WRITE_EXCLUSIVE)
    with pytest.raises(ReservationConflict):  # not the holder
        _move(h, B, ram_params(KEY_B, KEY_D, D.name))
    with pytest.raises(ReservationConflict):  # key mismatch
        _move(h, A, ram_params(KEY_B, KEY_D, D.name))
    with pytest.raises(ReservationConflict):  # unregistered
        _move(h, C, ram_params(0, KEY_D, D.name))
    with pytest.raises(SenseError) as e:  # SA key zero
        _move(h, A, ram_params(KEY_A, 0, D.name))
    assert field_pointer(e) == (False, 8, None)
    with pytest.raises(SenseError) as e:  # a target port we do not have
        _move(h, A, ram_params(KEY_A, KEY_D, D.name, rtpi=2))
    assert field_pointer(e) == (False, 18, None)
    with pytest.raises(SenseError) as e:  # to itself
        _move(h, A, ram_params(KEY_A, KEY_D, A.name))
    expect_sense(e, ILLEGAL, 0x26, 0)
    data = ram_params(KEY_A, KEY_D, D.name)
    with pytest.raises(SenseError) as e:  # TransportID length disagrees with the list
        _move(h, A, data + b"\0\0\0\0")
    expect_sense(e, ILLEGAL, 0x1A, 0)
    assert h.reservation() == (KEY_A, 0, T.WRITE_EXCLUSIVE)


def test_register_and_move_refused_for_all_registrants():
    h = make()
    h.register(A, KEY_A)
    h.reserve(A, KEY_A, T.WRITE_EXCLUSIVE_ALL_REGISTRANTS)
    with pytest.raises(ReservationConflict):
        _move(h, A, ram_params(KEY_A, KEY_D, D.name))


# ----------------------------------------------------------------- SPEC_I_PT


def test_spec_i_pt_registers_every_transport_id():
    h = make()
    h.out(A, REGISTER, 0, KEY_A, spec_i_pt=True, tids=(B.name, C.name, A.name))
    assert h.keys() == (1, [KEY_A, KEY_A, KEY_A])
    names = [r["initiator"] for r in h.pr.status()["registrants"]]
    assert names == [A.name, B.name, C.name]


def test_spec_i_pt_is_all_or_nothing():
    h = make()
    h.register(C, KEY_C)
    with pytest.raises(SenseError) as e:
        h.out(A, REGISTER, 0, KEY_A, spec_i_pt=True, tids=(B.name, C.name))
    expect_sense(e, ILLEGAL, 0x26, 0)
    assert h.keys() == (1, [KEY_C])  # neither A nor B got registered


def test_spec_i_pt_from_registered_nexus_is_invalid_field_in_cdb():
    h = make()
    h.register(A, KEY_A)
    with pytest.raises(SenseError) as e:
        h.out(A, REGISTER, KEY_A, KEY_B, spec_i_pt=True, tids=(B.name,))
    expect_sense(e, ILLEGAL, 0x24, 0)


@pytest.mark.parametrize("sa", [REGISTER_IGNORE, RESERVE, RELEASE, CLEAR, PREEMPT])
def test_spec_i_pt_only_valid_for_register(sa):
    h = make()
    h.register(A, KEY_A)
    with pytest.raises(SenseError) as e:
        h.out(A, sa, KEY_A, KEY_B, T.WRITE_EXCLUSIVE, spec_i_pt=True, tids=(B.name,))
    expect_sense(e, ILLEGAL, 0x26, 0)
    assert field_pointer(e) == (False, 20, 3)


def _spec_list(tid_blob: bytes, rkey=0, sakey=KEY_A) -> bytes:
    return struct.pack(">QQIBBHI", rkey, sakey, 0, 0x08, 0, 0, len(tid_blob)) + tid_blob


@pytest.mark.parametrize(
    "tid,pointer",
    [
        # protocol identifier 0 (Fibre Channel), not iSCSI
        (b"\x00\x00\x00\x14" + b"iqn.x\0".ljust(20, b"\0"), (False, 28, 3)),
        # ADDITIONAL LENGTH not a multiple of four
        (b"\x05\x00\x00\x15" + b"iqn.x\0".ljust(21, b"\0"), (False, 30, None)),
        # ADDITIONAL LENGTH below the 20-byte minimum
        (b"\x05\x00\x00\x08" + b"iqn.x\0\0\0", (False, 30, None)),
        # no NUL terminator
        (b"\x05\x00\x00\x14" + b"i" * 20, (False, 32, None)),
        # empty name
        (b"\x05\x00\x00\x14" + b"\0" * 20, (False, 32, None)),
        # format code 01b: an initiator port name whose ISID is not 12 hex digits
        (b"\x45\x00\x00\x20" + b"iqn.x,i,0x23d00001\0".ljust(32, b"\0"), (False, 32, None)),
        # format code 10b reserved
        (b"\x85\x00\x00\x14" + b"iqn.x\0".ljust(20, b"\0"), (False, 28, 7)),
        # non-UTF-8 name
        (b"\x05\x00\x00\x14" + b"\xff\xfe\0".ljust(20, b"\0"), (False, 32, None)),
    ],
    ids=[
        "protocol",
        "len-not-mult-4",
        "len-short",
        "no-nul",
        "empty",
        "format-01b",
        "format-10b",
        "utf8",
    ],
)
def test_bad_transport_ids_are_refused(tid, pointer):
    h = make()
    data = _spec_list(tid)
    with pytest.raises(SenseError) as e:
        h.handle(A, pr_out_cdb(REGISTER, 0, len(data)), data, 0)
    expect_sense(e, ILLEGAL, 0x26, 0)
    assert field_pointer(e) == pointer
    assert h.keys() == (0, [])


def test_transport_id_running_past_the_list_is_refused():
    h = make()
    tid = encode_iscsi_transport_id(B.name)
    data = _spec_list(tid[:-4])  # TPDL says shorter than the TransportID claims
    with pytest.raises(SenseError) as e:
        h.handle(A, pr_out_cdb(REGISTER, 0, len(data)), data, 0)
    expect_sense(e, ILLEGAL, 0x26, 0)


# ------------------------------------------------------- parameter list length


@pytest.mark.parametrize("length", [0, 8, 23, 25, 28, 32])
def test_basic_parameter_list_must_be_24_bytes(length):
    h = make()
    data = params(0, KEY_A).ljust(max(length, 24), b"\0")[:length]
    with pytest.raises(SenseError) as e:
        h.handle(A, pr_out_cdb(REGISTER, 0, length), data, 0)
    expect_sense(e, ILLEGAL, 0x1A, 0)
    assert h.keys() == (0, [])


def test_data_out_shorter_than_parameter_list_length():
    h = make()
    with pytest.raises(SenseError) as e:
        h.handle(A, pr_out_cdb(REGISTER, 0, 24), params(0, KEY_A)[:20], 0)
    expect_sense(e, ILLEGAL, 0x1A, 0)


def test_spec_i_pt_transport_id_length_must_match_the_list():
    h = make()
    data = params(0, KEY_A, spec_i_pt=True, tids=(B.name,))
    with pytest.raises(SenseError) as e:
        h.handle(A, pr_out_cdb(REGISTER, 0, len(data) + 4), data + b"\0" * 4, 0)
    expect_sense(e, ILLEGAL, 0x1A, 0)
    with pytest.raises(SenseError) as e:  # SPEC_I_PT but no room for TPDL
        short = data[:24]
        h.handle(A, pr_out_cdb(REGISTER, 0, 24), short, 0)
    expect_sense(e, ILLEGAL, 0x1A, 0)


def test_huge_transport_id_length_does_not_crash():
    h = make()
    data = struct.pack(">QQIBBHI", 0, KEY_A, 0, 0x08, 0, 0, 0xFFFFFFFF)
    with pytest.raises(SenseError) as e:
        h.handle(A, pr_out_cdb(REGISTER, 0, len(data)), data, 0)
    expect_sense(e, ILLEGAL, 0x1A, 0)


# ------------------------------------------------------------ other CDB errors


@pytest.mark.parametrize("sa", [0x08, 0x09, 0x1F])
def test_unknown_service_action(sa):
    h = make()
    data = params(0, KEY_A)
    with pytest.raises(SenseError) as e:
        h.handle(A, pr_out_cdb(sa, 0, 24), data, 0)
    expect_sense(e, ILLEGAL, 0x24, 0)
    assert field_pointer(e) == (True, 1, 4)


def test_aptpl_without_state_path_is_refused():
    h = make(state_path=None)
    with pytest.raises(SenseError) as e:
        h.register(A, KEY_A, aptpl=True)
    expect_sense(e, ILLEGAL, 0x26, 0)
    assert field_pointer(e) == (False, 20, 0)
    assert h.keys() == (0, [])
    h.register(A, KEY_A)
    h.reserve(A, KEY_A, T.WRITE_EXCLUSIVE)
    with pytest.raises(SenseError) as e:
        _move(h, A, ram_params(KEY_A, KEY_B, B.name, aptpl=True))
    assert field_pointer(e) == (False, 17, 0)


def test_aptpl_ignored_for_non_register_actions():
    h = make(state_path=None)
    h.register(A, KEY_A)
    # SPC-4 6.16.3: APTPL counts only for the register service actions.
    h.out(A, RESERVE, KEY_A, 0, T.WRITE_EXCLUSIVE, aptpl=True)
    assert h.reservation() == (KEY_A, 0, T.WRITE_EXCLUSIVE)


def test_short_cdb_is_refused_cleanly():
    h = make()
    with pytest.raises(SenseError):
        h.handle(A, bytes([0x5F, 0x00, 0x00]), b"", 0)


def test_failed_command_changes_nothing():
    h = three_registered()
    h.reserve(A, KEY_A, T.WRITE_EXCLUSIVE)
    before = h.pr.status()
    for bad in (
        lambda: h.out(B, PREEMPT, KEY_B, 0x9999),
        lambda: h.out(B, CLEAR, 0x1),
        lambda: h.out(A, RELEASE, KEY_A, 0, T.EXCLUSIVE_ACCESS),
    ):
        with pytest.raises((ReservationConflict, SenseError)):
            bad()
    assert h.pr.status() == before
    assert h.take_uas() == []


def test_registration_count_is_bounded():
    from bridge.scsi.reservations import pr_out as reservations

    h = make()
    names = tuple(f"iqn.2026-11.org.test:n{i}" for i in range(reservations.MAX_REGISTRATIONS + 1))
    with pytest.raises(SenseError) as e:
        h.out(A, REGISTER, 0, KEY_A, spec_i_pt=True, tids=names)
    expect_sense(e, ILLEGAL, 0x55, 0x04)
    assert h.keys() == (0, [])


def test_preempt_of_the_holder_checks_the_type_field():
    h = three_registered()
    h.reserve(B, KEY_B, T.WRITE_EXCLUSIVE)
    with pytest.raises(SenseError) as e:
        h.out(A, PREEMPT, KEY_A, KEY_B, 0x2)
    assert field_pointer(e) == (True, 2, 3)
    assert h.reservation() == (KEY_B, 0, T.WRITE_EXCLUSIVE)


def test_spec_i_pt_pointer_names_the_offending_transport_id():
    h = make()
    h.register(C, KEY_C)
    first = encode_iscsi_transport_id(B.name) + bytes(8)  # over-padded TransportID
    first = first[:2] + struct.pack(">H", len(first) - 4) + first[4:]
    blob = first + encode_iscsi_transport_id(C.name)
    data = _spec_list(blob)
    with pytest.raises(SenseError) as e:
        h.handle(A, pr_out_cdb(REGISTER, 0, len(data)), data, 0)
    assert field_pointer(e) == (False, 28 + len(first), None)
