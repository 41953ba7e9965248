"""CDB field decoding helpers (SPC-4 4.2): plain functions over bytes, no I/O."""

from __future__ import annotations

from .sense import FieldPointer, SenseError, SenseKey


def u16(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 2], "big")


def u24(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 3], "big")


def u32(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 4], "big")


def u64(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 8], "big")


# Opcodes whose byte 1 bits 4-0 hold a service action (SPC-4 4.2.5.1, and its
# operation code tables): PERSISTENT RESERVE IN/OUT (5Eh/5Fh), EXTENDED COPY (83h),
# RECEIVE COPY RESULTS (84h), SERVICE ACTION IN(16)/OUT(16) (9Eh/9Fh), MAINTENANCE
# IN/OUT (A3h/A4h), SERVICE ACTION IN(12) (ABh); and SBC-3's SANITIZE (48h, 5.21).
SERVICE_ACTION_OPCODES = frozenset({0x48, 0x5E, 0x5F, 0x83, 0x84, 0x9E, 0x9F, 0xA3, 0xA4, 0xAB})
VARIABLE_LENGTH_CDB = 0x7F  # SPC-4 4.2.4: its service action is in bytes 8-9


def service_action(cdb: bytes) -> int | None:
    """The CDB's service action (SPC-4 4.2.5.1, 4.2.4), None for an opcode without one
    or a CDB too short to hold it."""
    op = cdb[0]
    if op in SERVICE_ACTION_OPCODES:
        return cdb[1] & 0x1F if len(cdb) > 1 else None
    if op == VARIABLE_LENGTH_CDB:
        return u16(cdb, 8) if len(cdb) >= 10 else None
    return None


def cdb_length(opcode: int) -> int | None:
    """SPC-4 4.2.5.1 table 6: CDB length from the group code (top three bits).

    Group 3 (7Eh/7Fh variable length, reserved otherwise) and the vendor
    specific groups 6 and 7 have no fixed length: None.
    """
    return {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}.get(opcode >> 5)


def lu_not_supported() -> SenseError:
    """SPC-4 table: ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (25h/00h)."""
    return SenseError(SenseKey.ILLEGAL_REQUEST, 0x25, 0x00)


def invalid_transfer_length(byte: int) -> SenseError:
    """SBC-3 4.4: a transfer length above the block limits is INVALID FIELD IN CDB."""
    return SenseError(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00, FieldPointer(byte, None, True))
