"""Which commands a persistent reservation lets through, encoded once as data.

Sources: SPC-4 5.13.1 table "SPC commands that are allowed in the presence of
various reservations", SPC-4 table "PERSISTENT RESERVE OUT service actions that
are allowed in the presence of various reservations", and SBC-3 4.17 table
"SBC-3 commands that are allowed in the presence of various reservations".

Each row answers the question for an I_T nexus that does NOT hold the
reservation (the holder, and every registrant under an all-registrants type,
is always allowed everything). The SPC-4 footnote that lets SPC-3 devices
conflict on some read-type commands under Write Exclusive is not taken: we
allow them, and REPORT CAPABILITIES says so (ALLOW COMMANDS = 011b).

Commands that appear in no table get the most restrictive row (allowed only
from registered I_T nexuses under registrants-only/all-registrants types).
SPC-2 RESERVE/RELEASE are not rows: their rule is the CRH exception of SPC-4
5.13.3 and lives in reservations.py.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..cdb import VARIABLE_LENGTH_CDB, cdb_length, service_action


class ReservationType(enum.IntEnum):
    """SPC-4 6.15.3.3 table: persistent reservation TYPE codes."""

    WRITE_EXCLUSIVE = 0x1
    EXCLUSIVE_ACCESS = 0x3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 0x5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 0x6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 0x7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 0x8

    @property
    def all_registrants(self) -> bool:
        return self in (
            ReservationType.WRITE_EXCLUSIVE_ALL_REGISTRANTS,
            ReservationType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS,
        )

    @property
    def registrants_only(self) -> bool:
        return self in (
            ReservationType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
            ReservationType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
        )

    @property
    def write_exclusive(self) -> bool:
        return self in (
            ReservationType.WRITE_EXCLUSIVE,
            ReservationType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
            ReservationType.WRITE_EXCLUSIVE_ALL_REGISTRANTS,
        )

    @property
    def short_name(self) -> str:
        return _SHORT_NAMES[self]


_SHORT_NAMES = {
    ReservationType.WRITE_EXCLUSIVE: "WE",
    ReservationType.EXCLUSIVE_ACCESS: "EA",
    ReservationType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY: "WERO",
    ReservationType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: "EARO",
    ReservationType.WRITE_EXCLUSIVE_ALL_REGISTRANTS: "WEAR",
    ReservationType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS: "EAAR",
}

START_STOP_UNIT = 0x1B
PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E

A = True  # Allowed
C = False  # Conflict

CommandKey = tuple[int, int | None, str | None]


def command_key(cdb: bytes) -> CommandKey:
    """(opcode, service action or None, variant) of a CDB, for table look-up."""
    op = cdb[0]
    sa = service_action(cdb)
    variant: str | None = None
    if op == START_STOP_UNIT:
        # SBC-3 table: allowed everywhere only with START=1 and POWER CONDITION=0h.
        b4 = cdb[4] if len(cdb) > 4 else 0
        variant = "start" if (b4 & 0x01) and (b4 >> 4) == 0 else "stop-or-power-condition"
    elif op == PREVENT_ALLOW_MEDIUM_REMOVAL:
        b4 = cdb[4] if len(cdb) > 4 else 0xFF
        variant = "allow" if (b4 & 0x03) == 0 else "prevent"
    return op, sa, variant


@dataclass(frozen=True)
class ConflictRow:
    """One row of a conflict table: may a non-holder I_T nexus run this command?"""

    command: str
    opcode: int
    service_action: int | None
    variant: str | None
    source: str
    # (reservation type, I_T nexus registered?) -> allowed
    allowed: Mapping[tuple[ReservationType, bool], bool] = field(repr=False)

    @property
    def key(self) -> CommandKey:
        return self.opcode, self.service_action, self.variant

    def allows(self, rtype: ReservationType, registered: bool) -> bool:
        return self.allowed[(rtype, registered)]

    def example_cdb(self) -> bytes:
        """A minimal CDB that this row governs (for tests and introspection)."""
        if self.opcode == VARIABLE_LENGTH_CDB:
            cdb = bytearray(32)
            cdb[7] = 0x18  # ADDITIONAL CDB LENGTH
            struct.pack_into(">H", cdb, 8, self.service_action or 0)
        else:
            length = cdb_length(self.opcode)
            if length is None:
                raise ValueError(f"{self.command}: no fixed CDB length for opcode {self.opcode:#x}")
            cdb = bytearray(length)
            if self.service_action is not None:
                cdb[1] = self.service_action
        cdb[0] = self.opcode
        if self.variant == "start":
            cdb[4] = 0x01
        elif self.variant == "prevent":
            cdb[4] = 0x01
        return bytes(cdb)


_T = ReservationType


def _row(
    command: str,
    opcode: int,
    sa: int | None,
    we: bool,
    ea: bool,
    rr_registered: bool,
    we_rr_not_registered: bool,
    ea_rr_not_registered: bool,
    *,
    variant: str | None = None,
    source: str,
) -> ConflictRow:
    """A row in the shape of the SPC-4/SBC-3 tables' five columns.

    Columns: Write Exclusive from any I_T nexus; Exclusive Access from any I_T
    nexus; registrants-only or all-registrants from a registered I_T nexus;
    WE-RO/WE-AR from a not-registered I_T nexus; EA-RO/EA-AR from a
    not-registered I_T nexus.
    """
    allowed = {
        (_T.WRITE_EXCLUSIVE, True): we,
        (_T.WRITE_EXCLUSIVE, False): we,
        (_T.EXCLUSIVE_ACCESS, True): ea,
        (_T.EXCLUSIVE_ACCESS, False): ea,
        (_T.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, True): rr_registered,
        (_T.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, False): we_rr_not_registered,
        (_T.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY, True): rr_registered,
        (_T.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY, False): ea_rr_not_registered,
        (_T.WRITE_EXCLUSIVE_ALL_REGISTRANTS, True): rr_registered,
        (_T.WRITE_EXCLUSIVE_ALL_REGISTRANTS, False): we_rr_not_registered,
        (_T.EXCLUSIVE_ACCESS_ALL_REGISTRANTS, True): rr_registered,
        (_T.EXCLUSIVE_ACCESS_ALL_REGISTRANTS, False): ea_rr_not_registered,
    }
    return ConflictRow(command, opcode, sa, variant, source, allowed)


def _prout_row(command: str, sa: int, registered: bool, not_registered: bool) -> ConflictRow:
    """SPC-4 PR OUT table: the same two columns for every reservation type."""
    allowed = {}
    for t in ReservationType:
        allowed[(t, True)] = registered
        allowed[(t, False)] = not_registered
    return ConflictRow(command, 0x5F, sa, None, "SPC-4 5.13.1 (PR OUT)", allowed)


_SPC = "SPC-4 5.13.1"
_SBC = "SBC-3 4.17"

# Shorthand for the recurring column patterns.
_ALL = (A, A, A, A, A)  # allowed from everyone
_READ = (A, C, A, A, C)  # allowed through Write Exclusive types only
_WRITE = (C, C, A, C, C)  # allowed only from registrants under RO/AR types


def _spc(
    command: str, opcode: int, sa: int | None, cols: tuple[bool, ...], **kw: str
) -> ConflictRow:
    return _row(command, opcode, sa, *cols, source=_SPC, **kw)


def _sbc(
    command: str, opcode: int, sa: int | None, cols: tuple[bool, ...], **kw: str
) -> ConflictRow:
    return _row(command, opcode, sa, *cols, source=_SBC, **kw)


CONFLICT_TABLE: tuple[ConflictRow, ...] = (
    # --- SPC-4 ---
    _spc("ACCESS CONTROL IN", 0x86, None, _ALL),
    _spc("ACCESS CONTROL OUT", 0x87, None, _ALL),
    _spc("CHANGE ALIASES", 0xA4, 0x0B, _WRITE),
    _spc("EXTENDED COPY (LID1)", 0x83, 0x00, _WRITE),
    _spc("EXTENDED COPY (LID4)", 0x83, 0x01, _WRITE),
    _spc("INQUIRY", 0x12, None, _ALL),
    _spc("LOG SELECT", 0x4C, None, _WRITE),
    _spc("LOG SENSE", 0x4D, None, _ALL),
    _spc("MANAGEMENT PROTOCOL IN", 0xA3, 0x10, _READ),
    _spc("MANAGEMENT PROTOCOL OUT", 0xA4, 0x10, _WRITE),
    _spc("MODE SELECT(6)", 0x15, None, _WRITE),
    _spc("MODE SELECT(10)", 0x55, None, _WRITE),
    _spc("MODE SENSE(6)", 0x1A, None, _READ),
    _spc("MODE SENSE(10)", 0x5A, None, _READ),
    _spc("PERSISTENT RESERVE IN", 0x5E, None, _ALL),
    _spc("READ ATTRIBUTE", 0x8C, None, _READ),
    _spc("READ BUFFER", 0x3C, None, _READ),
    _spc("READ MEDIA SERIAL NUMBER", 0xAB, 0x01, _ALL),
    _spc("RECEIVE COPY RESULTS", 0x84, None, _READ),
    _spc("RECEIVE DIAGNOSTIC RESULTS", 0x1C, None, _READ),
    _spc("REPORT ALIASES", 0xA3, 0x0B, _ALL),
    _spc("REPORT IDENTIFYING INFORMATION", 0xA3, 0x05, _ALL),
    _spc("REPORT LUNS", 0xA0, None, _ALL),
    _spc("REPORT PRIORITY", 0xA3, 0x0E, _ALL),
    _spc("REPORT SUPPORTED OPERATION CODES", 0xA3, 0x0C, _READ),
    _spc("REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS", 0xA3, 0x0D, _READ),
    _spc("REPORT TARGET PORT GROUPS", 0xA3, 0x0A, _ALL),
    _spc("REPORT TIMESTAMP", 0xA3, 0x0F, _ALL),
    _spc("REQUEST SENSE", 0x03, None, _ALL),
    _spc("SECURITY PROTOCOL IN", 0xA2, None, _READ),
    _spc("SECURITY PROTOCOL OUT", 0xB5, None, _WRITE),
    _spc("SEND DIAGNOSTIC", 0x1D, None, _WRITE),
    _spc("SET IDENTIFYING INFORMATION", 0xA4, 0x06, _WRITE),
    _spc("SET PRIORITY", 0xA4, 0x0E, _WRITE),
    _spc("SET TARGET PORT GROUPS", 0xA4, 0x0A, _WRITE),
    _spc("SET TIMESTAMP", 0xA4, 0x0F, _WRITE),
    _spc("TEST UNIT READY", 0x00, None, _ALL),
    _spc("WRITE ATTRIBUTE", 0x8D, None, _WRITE),
    _spc("WRITE BUFFER", 0x3B, None, _WRITE),
    # --- SPC-4 PERSISTENT RESERVE OUT service actions (registered, not registered) ---
    _prout_row("PERSISTENT RESERVE OUT / REGISTER", 0x00, A, A),
    _prout_row("PERSISTENT RESERVE OUT / RESERVE", 0x01, C, C),
    _prout_row("PERSISTENT RESERVE OUT / RELEASE", 0x02, A, C),
    _prout_row("PERSISTENT RESERVE OUT / CLEAR", 0x03, A, C),
    _prout_row("PERSISTENT RESERVE OUT / PREEMPT", 0x04, A, C),
    _prout_row("PERSISTENT RESERVE OUT / PREEMPT AND ABORT", 0x05, A, C),
    _prout_row("PERSISTENT RESERVE OUT / REGISTER AND IGNORE EXISTING KEY", 0x06, A, A),
    _prout_row("PERSISTENT RESERVE OUT / REGISTER AND MOVE", 0x07, C, C),
    # --- SBC-3 ---
    _sbc("COMPARE AND WRITE", 0x89, None, _WRITE),
    _sbc("FORMAT UNIT", 0x04, None, _WRITE),
    _sbc("GET LBA STATUS", 0x9E, 0x12, _READ),
    _sbc("ORWRITE(16)", 0x8B, None, _WRITE),
    _sbc("ORWRITE(32)", 0x7F, 0x000E, _WRITE),
    _sbc("PRE-FETCH(10)", 0x34, None, _READ),
    _sbc("PRE-FETCH(16)", 0x90, None, _READ),
    _sbc("PREVENT ALLOW MEDIUM REMOVAL (PREVENT=0)", 0x1E, None, _ALL, variant="allow"),
    _sbc("PREVENT ALLOW MEDIUM REMOVAL (PREVENT<>0)", 0x1E, None, _WRITE, variant="prevent"),
    _sbc("READ(6)", 0x08, None, _READ),
    _sbc("READ(10)", 0x28, None, _READ),
    _sbc("READ(12)", 0xA8, None, _READ),
    _sbc("READ(16)", 0x88, None, _READ),
    _sbc("READ(32)", 0x7F, 0x0009, _READ),
    _sbc("READ CAPACITY(10)", 0x25, None, _ALL),
    _sbc("READ CAPACITY(16)", 0x9E, 0x10, _ALL),
    _sbc("READ DEFECT DATA(10)", 0x37, None, _READ),
    _sbc("READ DEFECT DATA(12)", 0xB7, None, _READ),
    _sbc("READ LONG(10)", 0x3E, None, _WRITE),
    _sbc("READ LONG(16)", 0x9E, 0x11, _WRITE),
    _sbc("REASSIGN BLOCKS", 0x07, None, _WRITE),
    _sbc("REPORT REFERRALS", 0x9E, 0x13, _ALL),
    _sbc("SANITIZE / OVERWRITE", 0x48, 0x01, _WRITE),
    _sbc("SANITIZE / BLOCK ERASE", 0x48, 0x02, _WRITE),
    _sbc("SANITIZE / CRYPTOGRAPHIC ERASE", 0x48, 0x03, _WRITE),
    _sbc("SANITIZE / EXIT FAILURE MODE", 0x48, 0x1F, _WRITE),
    _sbc("START STOP UNIT (START=1, POWER CONDITION=0h)", 0x1B, None, _ALL, variant="start"),
    _sbc(
        "START STOP UNIT (START=0 or POWER CONDITION<>0h)",
        0x1B,
        None,
        _WRITE,
        variant="stop-or-power-condition",
    ),
    _sbc("SYNCHRONIZE CACHE(10)", 0x35, None, _WRITE),
    _sbc("SYNCHRONIZE CACHE(16)", 0x91, None, _WRITE),
    _sbc("UNMAP", 0x42, None, _WRITE),
    _sbc("VERIFY(10)", 0x2F, None, _READ),
    _sbc("VERIFY(12)", 0xAF, None, _READ),
    _sbc("VERIFY(16)", 0x8F, None, _READ),
    _sbc("VERIFY(32)", 0x7F, 0x000A, _READ),
    _sbc("WRITE(6)", 0x0A, None, _WRITE),
    _sbc("WRITE(10)", 0x2A, None, _WRITE),
    _sbc("WRITE(12)", 0xAA, None, _WRITE),
    _sbc("WRITE(16)", 0x8A, None, _WRITE),
    _sbc("WRITE(32)", 0x7F, 0x000B, _WRITE),
    _sbc("WRITE AND VERIFY(10)", 0x2E, None, _WRITE),
    _sbc("WRITE AND VERIFY(12)", 0xAE, None, _WRITE),
    _sbc("WRITE AND VERIFY(16)", 0x8E, None, _WRITE),
    _sbc("WRITE AND VERIFY(32)", 0x7F, 0x000C, _WRITE),
    _sbc("WRITE LONG(10)", 0x3F, None, _WRITE),
    _sbc("WRITE LONG(16)", 0x9F, 0x11, _WRITE),
    _sbc("WRITE SAME(10)", 0x41, None, _WRITE),
    _sbc("WRITE SAME(16)", 0x93, None, _WRITE),
    _sbc("WRITE SAME(32)", 0x7F, 0x000D, _WRITE),
    _sbc("XDREAD(10)", 0x52, None, _READ),
    _sbc("XDREAD(32)", 0x7F, 0x0003, _READ),
    _sbc("XDWRITE(10)", 0x50, None, _WRITE),
    _sbc("XDWRITE(32)", 0x7F, 0x0004, _WRITE),
    _sbc("XDWRITEREAD(10)", 0x53, None, _WRITE),
    _sbc("XDWRITEREAD(32)", 0x7F, 0x0007, _WRITE),
    _sbc("XPWRITE(10)", 0x51, None, _WRITE),
    _sbc("XPWRITE(32)", 0x7F, 0x0006, _WRITE),
)

# Commands in no table: the most restrictive behaviour.
DEFAULT_ROW = _row("(command not in the tables)", -1, None, *_WRITE, source="(default)")

_BY_KEY: dict[CommandKey, ConflictRow] = {}
for _r in CONFLICT_TABLE:
    if _r.key in _BY_KEY:  # pragma: no cover - table construction error
        raise AssertionError(f"duplicate conflict table row {_r.key}")
    _BY_KEY[_r.key] = _r


def conflict_row(cdb: bytes) -> ConflictRow:
    """The table row that governs this CDB (DEFAULT_ROW when in no table)."""
    op, sa, variant = command_key(cdb)
    row = _BY_KEY.get((op, sa, variant))
    if row is None and sa is not None:
        row = _BY_KEY.get((op, None, variant))
    return row if row is not None else DEFAULT_ROW


def conflict_table_rows() -> tuple[ConflictRow, ...]:
    """Every row of the encoded SPC-4/SBC-3 tables, for introspection and tests."""
    return CONFLICT_TABLE


# SPC-2 5.5.1 / 7.21: commands another initiator may still run while an SPC-2
# RESERVE is held. RELEASE from a non-holder completes GOOD without effect.
SPC2_ALLOWED_FROM_OTHERS: frozenset[CommandKey] = frozenset(
    {
        (0x12, None, None),  # INQUIRY
        (0x03, None, None),  # REQUEST SENSE
        (0xA0, None, None),  # REPORT LUNS
        (0x17, None, None),  # RELEASE(6)
        (0x57, None, None),  # RELEASE(10)
        (0x1E, None, "allow"),  # PREVENT ALLOW MEDIUM REMOVAL with PREVENT=0
    }
)
