"""Sense data (SPC-4 4.5) and the exception command handlers raise to report it."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass


class SenseKey(enum.IntEnum):
    """SPC-4 4.5.6 table 43."""

    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE


@dataclass(frozen=True)
class FieldPointer:
    """SPC-4 4.5.2.4.2: sense-key specific field pointer (C/D, BPV, bit, byte)."""

    byte: int
    bit: int | None = None  # None: BPV=0, the whole byte is in error
    in_cdb: bool = True  # C/D: 1 = CDB, 0 = parameter list

    def encode(self) -> bytes:
        b0 = 0x80 | (0x40 if self.in_cdb else 0)
        if self.bit is not None:
            b0 |= 0x08 | (self.bit & 0x7)
        return struct.pack(">BH", b0, self.byte & 0xFFFF)


@dataclass(frozen=True)
class ProgressIndication:
    """SPC-4 4.5.2.4.4: sense-key specific progress indication (SKSV, fraction of 65536)."""

    progress: int

    def encode(self) -> bytes:
        return struct.pack(">BH", 0x80, max(0, min(self.progress, 0xFFFF)))


@dataclass(frozen=True)
class SenseData:
    key: SenseKey
    asc: int
    ascq: int
    field_pointer: FieldPointer | ProgressIndication | None = None
    information: int | None = None  # e.g. the first miscomparing byte offset (SBC-3 5.2)

    def encode(self, descriptor: bool = False) -> bytes:
        """Fixed format (SPC-4 4.5.3) or descriptor format (4.5.2) when D_SENSE is set."""
        if descriptor:
            descs = b""
            if self.information is not None:
                # 4.5.2.2 information descriptor, VALID=1
                descs += struct.pack(">BBBBQ", 0x00, 0x0A, 0x80, 0, self.information)
            if self.field_pointer is not None:
                # 4.5.2.3 sense key specific descriptor
                descs += struct.pack(">BBBB", 0x02, 0x06, 0, 0) + self.field_pointer.encode() + b"\0"
            return bytes((0x72, self.key, self.asc, self.ascq, 0, 0, 0, len(descs))) + descs
        info = self.information if self.information is not None else 0
        valid = 0x80 if self.information is not None and info <= 0xFFFFFFFF else 0
        sks = self.field_pointer.encode() if self.field_pointer is not None else b"\0\0\0"
        return (
            bytes((0x70 | valid, 0, self.key))
            + struct.pack(">I", info & 0xFFFFFFFF)
            + bytes((10,))  # additional sense length: bytes 8..17
            + b"\0\0\0\0"  # command-specific information
            + bytes((self.asc, self.ascq, 0))
            + sks
        )


class SenseError(Exception):
    """Raised by a command handler: the command ends in CHECK CONDITION with this sense."""

    def __init__(
        self,
        key: SenseKey,
        asc: int,
        ascq: int = 0,
        field_pointer: FieldPointer | ProgressIndication | None = None,
        information: int | None = None,
    ) -> None:
        super().__init__(f"{key.name} {asc:02x}/{ascq:02x}")
        self.sense = SenseData(key, asc, ascq, field_pointer, information)


def invalid_field_in_cdb(byte: int, bit: int | None = None) -> SenseError:
    """ILLEGAL REQUEST, INVALID FIELD IN CDB (24h/00h) pointing at the byte and bit."""
    return SenseError(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00, FieldPointer(byte, bit, True))


def invalid_field_in_parameter_list(byte: int, bit: int | None = None) -> SenseError:
    """ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST (26h/00h)."""
    return SenseError(SenseKey.ILLEGAL_REQUEST, 0x26, 0x00, FieldPointer(byte, bit, False))


def invalid_opcode() -> SenseError:
    """ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE (20h/00h), pointing at byte 0."""
    return SenseError(SenseKey.ILLEGAL_REQUEST, 0x20, 0x00, FieldPointer(0, None, True))


def lba_out_of_range() -> SenseError:
    """ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE (21h/00h), SBC-3 4.5."""
    return SenseError(SenseKey.ILLEGAL_REQUEST, 0x21, 0x00)


def parameter_list_length_error() -> SenseError:
    """ILLEGAL REQUEST, PARAMETER LIST LENGTH ERROR (1Ah/00h)."""
    return SenseError(SenseKey.ILLEGAL_REQUEST, 0x1A, 0x00)


def write_protected() -> SenseError:
    """DATA PROTECT, WRITE PROTECTED (27h/00h)."""
    return SenseError(SenseKey.DATA_PROTECT, 0x27, 0x00)
