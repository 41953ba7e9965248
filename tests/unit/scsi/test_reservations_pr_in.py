"""PERSISTENT RESERVE IN: READ KEYS, READ RESERVATION, REPORT CAPABILITIES, READ FULL STATUS."""

from __future__ import annotations

import struct

import pytest

from bridge.scsi.reservations import ReservationType, pr_in_cdb
from bridge.scsi.reservations.codec import parse_iscsi_transport_id

from .test_reservations_helpers import (
    KEY_A,
    KEY_B,
    READ_FULL_STATUS,
    READ_KEYS,
    READ_RESERVATION,
    REPORT_CAPABILITIES,
    A,
    B,
    C,
    SenseError,
    expect_sense,
    field_pointer,
    make,
)

T = ReservationType


def parse_full_status(data: bytes) -> tuple[int, list[dict]]:
    gen, n = struct.unpack_from(">II", data)
    assert len(data) == 8 + n
    out, pos = [], 8
    while pos < 8 + n:
        key, _, flags, scope_type, rtpi, dlen = struct.unpack_from(">QIBB4xHI", data, pos)
        name, used = parse_iscsi_transport_id(data, pos + 24)
        assert used == dlen
        out.append(
            {
                "key": key,
                "all_tg_pt": bool(flags & 2),
                "holder": bool(flags & 1),
                "scope_type": scope_type,
                "rtpi": rtpi,
                "name": name,
            }
        )
        pos += 24 + dlen
    return gen, out


def test_read_keys_empty_and_populated():
    h = make()
    assert h.pr_in(READ_KEYS) == bytes(8)
    h.register(A, KEY_A)
    h.register(B, KEY_B)
    data = h.pr_in(READ_KEYS)
    assert data == struct.pack(">IIQQ", 2, 16, KEY_A, KEY_B)


def test_read_reservation_none_and_held():
    h = make()
    h.register(A, KEY_A)
    assert h.pr_in(READ_RESERVATION) == struct.pack(">II", 1, 0)
    h.reserve(A, KEY_A, T.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY)
    data = h.pr_in(READ_RESERVATION)
    assert len(data) == 24
    assert struct.unpack_from(">IIQ", data) == (1, 16, KEY_A)
    assert data[21] == 0x06  # scope 0, type EARO


def test_report_capabilities_is_truthful():
    h = make(state_path=None)
    data = h.pr_in(REPORT_CAPABILITIES)
    assert len(data) == 8
    assert struct.unpack_from(">H", data)[0] == 8
    b2, b3 = data[2], data[3]
    assert b2 & 0x10  # CRH
    assert b2 & 0x08  # SIP_C
    assert b2 & 0x04  # ATP_C
    assert not b2 & 0x01  # PTPL_C: no state path, no persistence
    assert b3 & 0x80  # TMV
    assert (b3 >> 4) & 0x7 == 0b011  # ALLOW COMMANDS
    assert not b3 & 0x01  # PTPL_A
    # Type mask: WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX | EX_AC_AR.
    assert data[4:6] == bytes([0x80 | 0x40 | 0x20 | 0x08 | 0x02, 0x01])


def test_report_capabilities_ptpl(tmp_path):
    h = make(state_path=str(tmp_path / "disk0.img.pr.json"))
    data = h.pr_in(REPORT_CAPABILITIES)
    assert data[2] & 0x01  # PTPL_C
    assert not data[3] & 0x01
    h.register(A, KEY_A, aptpl=True)
    assert h.pr_in(REPORT_CAPABILITIES)[3] & 0x01  # PTPL_A


def test_read_full_status_names_every_registrant():
    h = make()
    h.register(A, KEY_A)
    h.register(B, KEY_B, all_tg_pt=True)
    h.reserve(B, KEY_B, T.WRITE_EXCLUSIVE)
    gen, entries = parse_full_status(h.pr_in(READ_FULL_STATUS))
    assert gen == 2
    assert [(e["name"], e["key"], e["holder"], e["all_tg_pt"]) for e in entries] == [
        (A.name, KEY_A, False, False),
        (B.name, KEY_B, True, True),
    ]
    assert entries[0]["scope_type"] == 0
    assert entries[1]["scope_type"] == 0x01
    assert {e["rtpi"] for e in entries} == {1}


def test_read_full_status_all_registrants_are_holders():
    h = make()
    h.register(A, KEY_A)
    h.register(B, KEY_B)
    h.reserve(A, KEY_A, T.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)
    _, entries = parse_full_status(h.pr_in(READ_FULL_STATUS))
    assert all(e["holder"] and e["scope_type"] == 0x08 for e in entries)
    assert h.reservation() == (0, 0, T.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)


@pytest.mark.parametrize("alloc", [0, 1, 7, 8, 12, 15])
def test_allocation_length_truncates(alloc):
    h = make()
    h.register(A, KEY_A)
    h.register(B, KEY_B)
    full = h.pr_in(READ_KEYS)
    assert h.pr_in(READ_KEYS, alloc) == full[:alloc]


def test_buffer_smaller_than_allocation_length_truncates_too():
    h = make()
    h.register(A, KEY_A)
    data, _ = h.handle(A, pr_in_cdb(READ_KEYS, 0xFFFF), b"", 10)
    assert len(data) == 10


@pytest.mark.parametrize("sa", [0x04, 0x05, 0x1F])
def test_unknown_service_action(sa):
    h = make()
    with pytest.raises(SenseError) as e:
        h.pr_in(sa)
    expect_sense(e, 0x5, 0x24, 0)
    assert field_pointer(e) == (True, 1, 4)


def test_pr_in_allowed_from_unregistered_nexus_under_exclusive_access():
    h = make()
    h.register(A, KEY_A)
    h.reserve(A, KEY_A, T.EXCLUSIVE_ACCESS)
    assert h.pr.conflicts(C.name, pr_in_cdb(READ_KEYS)) is False
    assert h.pr_in(READ_KEYS, ini=C)[:8] == struct.pack(">II", 1, 8)
