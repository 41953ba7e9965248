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
