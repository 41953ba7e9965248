"""PERSISTENT RESERVE IN/OUT wire formats (SPC-4 6.15, 6.16) and iSCSI TransportIDs.

Plain functions over bytes. Everything here is guest-controlled: parsers
check each length before reading and raise SenseError pointing at the field.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from ..sense import (
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
    parameter_list_length_error,
)

PERSISTENT_RESERVE_IN = 0x5E
PERSISTENT_RESERVE_OUT = 0x5F

# SPC-4 7.6.4.1: protocol identifier of iSCSI.
PROTOCOL_ID_ISCSI = 0x5
# SPC-4 7.6.4.6: an iSCSI name is at most 223 bytes plus its NUL.
MAX_ISCSI_NAME = 223
# SPC-4 6.16.3: the basic PR OUT parameter list is 24 bytes.
BASIC_PARAMETER_LIST_LENGTH = 24


class PrInAction(enum.IntEnum):
    """SPC-4 6.15.1 table: PERSISTENT RESERVE IN service actions."""

    READ_KEYS = 0x00
    READ_RESERVATION = 0x01
    REPORT_CAPABILITIES = 0x02
    READ_FULL_STATUS = 0x03


class PrOutAction(enum.IntEnum):
    """SPC-4 6.16.2 table: PERSISTENT RESERVE OUT service actions (REPLACE LOST RESERVATION unsupported)."""

    REGISTER = 0x00
    RESERVE = 0x01
    RELEASE = 0x02
    CLEAR = 0x03
    PREEMPT = 0x04
    PREEMPT_AND_ABORT = 0x05
    REGISTER_AND_IGNORE_EXISTING_KEY = 0x06
    REGISTER_AND_MOVE = 0x07


# ---------------------------------------------------------------- TransportIDs


def parse_iscsi_transport_id(buf: bytes, offset: int) -> tuple[str, int]:
    """Parse one TransportID at ``offset`` of a parameter list; returns (name, length).

    SPC-4 7.6.4.6: FORMAT CODE 00b carries an iSCSI name; 01b an initiator port
    name (name + ",i,0x" + 12 hex digits of ISID), returned with the ISID in lower
    case, the form bridge/scsi/ports.py names initiator ports by. Field pointers
    are parameter-list byte offsets.
    """
    if len(buf) - offset < 4:
        raise invalid_field_in_parameter_list(offset)
    b0 = buf[offset]
    if b0 & 0x0F != PROTOCOL_ID_ISCSI:
        raise invalid_field_in_parameter_list(offset, 3)
    if b0 & 0x30:  # reserved bits
        raise invalid_field_in_parameter_list(offset, 5)
    fmt = b0 >> 6
    if fmt not in (0, 1):
        raise invalid_field_in_parameter_list(offset, 7)
    (additional,) = struct.unpack_from(">H", buf, offset + 2)
    # The ADDITIONAL LENGTH is a multiple of 4 and at least 20 (24-byte minimum).
    if additional < 20 or additional % 4 or offset + 4 + additional > len(buf):
        raise invalid_field_in_parameter_list(offset + 2)
    raw = buf[offset + 4 : offset + 4 + additional]
    nul = raw.find(b"\0")
    if nul <= 0 or nul > MAX_ISCSI_NAME + (0 if fmt == 0 else 5 + 12):
        raise invalid_field_in_parameter_list(offset + 4)
    try:
        text = raw[:nul].decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_field_in_parameter_list(offset + 4) from None
    if not text.isprintable() or any(c.isspace() for c in text):
        raise invalid_field_in_parameter_list(offset + 4)
    sep = text.lower().find(",i,0x")
    if fmt == 1:
        # The ",i,0x" separator, then a 12-hex-digit ISID.
        isid = text[sep + 5:] if sep > 0 else ""
        if len(isid) != 12 or any(c not in "0123456789abcdefABCDEF" for c in isid):
            raise invalid_field_in_parameter_list(offset + 4)
        return f"{text[:sep]},i,0x{isid.lower()}", 4 + additional
    if sep >= 0:
        raise invalid_field_in_parameter_list(offset + 4)
    return text, 4 + additional


def encode_iscsi_transport_id(name: str) -> bytes:
    """SPC-4 7.6.4.6: FORMAT CODE 00b for an iSCSI name, 01b for an initiator port name
    with an ISID (",i,0x"); NUL-terminated, padded to 4, at least 24 bytes."""
    raw = name.encode() + b"\0"
    raw += b"\0" * (-len(raw) % 4)
    if len(raw) < 20:
        raw += b"\0" * (20 - len(raw))
    fmt = 0x40 if ",i,0x" in name.lower() else 0
    return struct.pack(">BBH", fmt | PROTOCOL_ID_ISCSI, 0, len(raw)) + raw


def parse_transport_id_list(buf: bytes, start: int, length: int) -> tuple[tuple[str, int], ...]:
    """(name, offset) of each TransportID in buf[start:start+length] (SPEC_I_PT, SPC-4 6.16.3)."""
    end = start + length
    found: list[tuple[str, int]] = []
    pos = start
    view = buf[:end]
    while pos < end:
        name, used = parse_iscsi_transport_id(view, pos)
        found.append((name, pos))
        pos += used
    return tuple(found)


# ----------------------------------------------------------- PR OUT parameters


@dataclass(frozen=True)
class PrOutCdb:
    """SPC-4 6.16.1: the fields of a PERSISTENT RESERVE OUT CDB."""

    service_action: PrOutAction
    scope: int
    type: int
    parameter_list_length: int


def parse_pr_out_cdb(cdb: bytes) -> PrOutCdb:
    if len(cdb) < 10:
        raise invalid_field_in_cdb(0)
    sa = cdb[1] & 0x1F
    if sa not in PrOutAction._value2member_map_:
        raise invalid_field_in_cdb(1, 4)
    (pll,) = struct.unpack_from(">I", cdb, 5)
    return PrOutCdb(PrOutAction(sa), cdb[2] >> 4, cdb[2] & 0x0F, pll)


@dataclass(frozen=True)
class PrOutParameters:
    """SPC-4 6.16.3: the basic parameter list, plus SPEC_I_PT TransportIDs."""

    reservation_key: int
    service_action_key: int
    spec_i_pt: bool
    all_tg_pt: bool
    aptpl: bool
    transport_ids: tuple[str, ...] = ()
    transport_id_offsets: tuple[int, ...] = ()  # parameter-list offset of each TransportID


@dataclass(frozen=True)
class RegisterAndMoveParameters:
    """SPC-4 6.16.4: the REGISTER AND MOVE parameter list."""

    reservation_key: int
    service_action_key: int
    unreg: bool
    aptpl: bool
    relative_target_port: int
    transport_id: str


def _parameter_list(cdb: PrOutCdb, data_out: bytes) -> bytes:
    # The initiator must send at least what the CDB announces.
    if len(data_out) < cdb.parameter_list_length:
        raise parameter_list_length_error()
    if cdb.parameter_list_length < BASIC_PARAMETER_LIST_LENGTH:
        raise parameter_list_length_error()
    return bytes(data_out[: cdb.parameter_list_length])


def parse_pr_out_parameters(cdb: PrOutCdb, data_out: bytes) -> PrOutParameters:
    """Basic parameter list of every service action except REGISTER AND MOVE."""
    buf = _parameter_list(cdb, data_out)
    rkey, sakey = struct.unpack_from(">QQ", buf, 0)
    flags = buf[20]
    spec_i_pt = bool(flags & 0x08)
    all_tg_pt = bool(flags & 0x04)
    aptpl = bool(flags & 0x01)
    if spec_i_pt and cdb.service_action != PrOutAction.REGISTER:
        # SPC-4 6.16.3: SPEC_I_PT is valid only for REGISTER.
        raise invalid_field_in_parameter_list(20, 3)
    if not spec_i_pt:
        if len(buf) != BASIC_PARAMETER_LIST_LENGTH:
            raise parameter_list_length_error()
        return PrOutParameters(rkey, sakey, False, all_tg_pt, aptpl)
    if len(buf) < BASIC_PARAMETER_LIST_LENGTH + 4:
        raise parameter_list_length_error()
    (tpdl,) = struct.unpack_from(">I", buf, 24)
    if 28 + tpdl != len(buf):
        raise parameter_list_length_error()
    found = parse_transport_id_list(buf, 28, tpdl)
    names = tuple(n for n, _ in found)
    offsets = tuple(o for _, o in found)
    return PrOutParameters(rkey, sakey, True, all_tg_pt, aptpl, names, offsets)


def parse_register_and_move_parameters(cdb: PrOutCdb, data_out: bytes) -> RegisterAndMoveParameters:
    buf = _parameter_list(cdb, data_out)
    rkey, sakey = struct.unpack_from(">QQ", buf, 0)
    unreg = bool(buf[17] & 0x02)
    aptpl = bool(buf[17] & 0x01)
    (rtpi, tpdl) = struct.unpack_from(">HI", buf, 18)
    if 24 + tpdl != len(buf):
        raise parameter_list_length_error()
    if tpdl == 0:
        raise invalid_field_in_parameter_list(20)
    name, used = parse_iscsi_transport_id(buf, 24)
    if 24 + used != len(buf):
        # Exactly one TransportID (SPC-4 6.16.4).
        raise invalid_field_in_parameter_list(20)
    return RegisterAndMoveParameters(rkey, sakey, unreg, aptpl, rtpi, name)


# -------------------------------------------------------------- PR IN encoding


def pr_in_allocation_length(cdb: bytes) -> int:
    """SPC-4 6.15.1: ALLOCATION LENGTH, bytes 7..8."""
    return struct.unpack_from(">H", cdb, 7)[0]


def encode_read_keys(generation: int, keys: list[int]) -> bytes:
    """SPC-4 6.15.2: PRGENERATION, ADDITIONAL LENGTH, the registered keys."""
    body = b"".join(struct.pack(">Q", k) for k in keys)
    return struct.pack(">II", generation, len(body)) + body


def encode_read_reservation(generation: int, reservation: tuple[int, int, int] | None) -> bytes:
    """SPC-4 6.15.3: reservation = (key, scope, type) or None."""
    if reservation is None:
        return struct.pack(">II", generation, 0)
    key, scope, rtype = reservation
    body = struct.pack(">QIBBH", key, 0, 0, (scope << 4) | rtype, 0)
    return struct.pack(">II", generation, len(body)) + body


@dataclass(frozen=True)
class Capabilities:
    """SPC-4 6.15.4: REPORT CAPABILITIES parameter data."""

    crh: bool
    sip_c: bool
    atp_c: bool
    ptpl_c: bool
    tmv: bool
    allow_commands: int
    ptpl_a: bool
    type_mask: int  # bytes 4..5 as one big-endian 16-bit value

    def encode(self) -> bytes:
        b2 = (0x10 if self.crh else 0) | (0x08 if self.sip_c else 0)
        b2 |= (0x04 if self.atp_c else 0) | (0x01 if self.ptpl_c else 0)
        b3 = (0x80 if self.tmv else 0) | ((self.allow_commands & 0x7) << 4)
        b3 |= 0x01 if self.ptpl_a else 0
        return struct.pack(">HBBHH", 8, b2, b3, self.type_mask, 0)


# SPC-4 6.15.4: PERSISTENT RESERVATION TYPE MASK bits (byte 4 bit 7 = 0x8000).
TYPE_MASK_BITS = {
    0x7: 0x8000,  # WR_EX_AR
    0x6: 0x4000,  # EX_AC_RO
    0x5: 0x2000,  # WR_EX_RO
    0x3: 0x0800,  # EX_AC
    0x1: 0x0200,  # WR_EX
    0x8: 0x0001,  # EX_AC_AR (byte 5 bit 0)
}


@dataclass(frozen=True)
class FullStatusEntry:
    key: int
    all_tg_pt: bool
    holder: bool
    scope: int
    type: int
    relative_target_port: int
    transport_id: bytes


def encode_read_full_status(generation: int, entries: list[FullStatusEntry]) -> bytes:
    """SPC-4 6.15.5: one full status descriptor per registered I_T nexus."""
    parts = []
    for e in entries:
        flags = (0x02 if e.all_tg_pt else 0) | (0x01 if e.holder else 0)
        scope_type = ((e.scope << 4) | e.type) if e.holder else 0
        parts.append(
            struct.pack(
                ">QIBB4xHI",
                e.key,
                0,
                flags,
                scope_type,
                e.relative_target_port,
                len(e.transport_id),
            )
            + e.transport_id
        )
    body = b"".join(parts)
    return struct.pack(">II", generation, len(body)) + body
