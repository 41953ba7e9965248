"""Asymmetric logical unit access (SPC-4 5.15): access states and what each allows.

Sans-I/O: the states, the command classes, and THE TABLE (state x command class ->
allowed, else the sense the command ends with). The target core asks ``refusal`` for
every command that reaches an LU; ports.py holds which group is in which state.

Sources (SPC-4 r37):
- 5.15.2.4.2 active/optimized, 5.15.2.4.3 active/non-optimized: every command.
- 5.15.2.4.4 standby: INQUIRY, LOG SELECT/SENSE, MODE SELECT/SENSE, REPORT LUNS, RECEIVE
  DIAGNOSTIC RESULTS, SEND DIAGNOSTIC, REPORT TARGET PORT GROUPS, SET TARGET PORT GROUPS,
  REQUEST SENSE, PERSISTENT RESERVE IN/OUT, echo buffer modes of READ/WRITE BUFFER;
  anything else: NOT READY, LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN STANDBY STATE
  (04h/0Bh).
- 5.15.2.4.5 unavailable: INQUIRY, REPORT LUNS, REPORT/SET TARGET PORT GROUPS, REQUEST
  SENSE, echo buffer modes; anything else: NOT READY, LOGICAL UNIT NOT ACCESSIBLE, TARGET
  PORT IN UNAVAILABLE STATE (04h/0Ch).
- 5.15.2.5 transitioning: INQUIRY, REPORT LUNS, REPORT TARGET PORT GROUPS, REQUEST SENSE,
  echo buffer modes; anything else (SET TARGET PORT GROUPS included): NOT READY, LOGICAL
  UNIT NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE TRANSITION (04h/0Ah).
- 5.15.2.4.6 offline: the port cannot be used to reach the LU. A command that still
  arrives (ours can: the link is up) is answered like unavailable but without SET
  TARGET PORT GROUPS (only an implicit transition leaves offline), with LOGICAL UNIT
  NOT READY, OFFLINE (04h/12h). This row is our reading, not a list of the standard.
- REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS describe the device
  server, not the medium: answered in standby and unavailable too (our choice; they
  are not in r37's lists, later revisions of the standby list add them).
"""

from __future__ import annotations

import enum

from .sense import SenseData, SenseKey


class AccessState(enum.IntEnum):
    """SPC-4 6.37 table (ASYMMETRIC ACCESS STATE field). LBA dependent is not offered."""

    ACTIVE_OPTIMIZED = 0x0
    ACTIVE_NON_OPTIMIZED = 0x1
    STANDBY = 0x2
    UNAVAILABLE = 0x3
    OFFLINE = 0xE
    TRANSITIONING = 0xF

    @property
    def label(self) -> str:
        return STATE_NAMES[self]


STATE_NAMES = {
    AccessState.ACTIVE_OPTIMIZED: "active/optimized",
    AccessState.ACTIVE_NON_OPTIMIZED: "active/non-optimized",
    AccessState.STANDBY: "standby",
    AccessState.UNAVAILABLE: "unavailable",
    AccessState.OFFLINE: "offline",
    AccessState.TRANSITIONING: "transitioning",
}
# Short forms accepted by the configuration and the control plane.
STATE_ALIASES = {
    **{v: k for k, v in STATE_NAMES.items()},
    "ao": AccessState.ACTIVE_OPTIMIZED, "optimized": AccessState.ACTIVE_OPTIMIZED,
    "active-optimized": AccessState.ACTIVE_OPTIMIZED,
    "an": AccessState.ACTIVE_NON_OPTIMIZED, "non-optimized": AccessState.ACTIVE_NON_OPTIMIZED,
    "active-non-optimized": AccessState.ACTIVE_NON_OPTIMIZED,
    "active": AccessState.ACTIVE_NON_OPTIMIZED,
}


def parse_state(text: str) -> AccessState:
    try:
        return STATE_ALIASES[text.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown access state {text!r}; one of "
                         f"{', '.join(STATE_NAMES.values())}") from None


# SPC-4 6.45: the states SET TARGET PORT GROUPS may request (others: INVALID FIELD IN
# PARAMETER LIST).
STPG_SETTABLE = frozenset({AccessState.ACTIVE_OPTIMIZED, AccessState.ACTIVE_NON_OPTIMIZED,
                           AccessState.STANDBY, AccessState.UNAVAILABLE})


class CommandClass(enum.Enum):
    """The command classes of the table (the lists of SPC-4 5.15.2.4-5.15.2.5)."""

    IDENTIFY = "INQUIRY, REPORT LUNS, REQUEST SENSE"
    REPORT_TPG = "REPORT TARGET PORT GROUPS"
    SET_TPG = "SET TARGET PORT GROUPS"
    ECHO_BUFFER = "READ/WRITE BUFFER echo buffer modes"
    DEVICE_REPORTS = "REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS"
    MODE_LOG_DIAG = "MODE SENSE/SELECT, LOG SENSE/SELECT, SEND/RECEIVE DIAGNOSTIC"
    RESERVATIONS = "PERSISTENT RESERVE IN/OUT"
    OTHER = "every other command (medium access, capacity, SPC-2 RESERVE/RELEASE, ...)"


_BY_KEY: dict[tuple[int, int | None], CommandClass] = {
    (0x12, None): CommandClass.IDENTIFY, (0xA0, None): CommandClass.IDENTIFY,
    (0x03, None): CommandClass.IDENTIFY,
    (0xA3, 0x0A): CommandClass.REPORT_TPG, (0xA4, 0x0A): CommandClass.SET_TPG,
    (0xA3, 0x0C): CommandClass.DEVICE_REPORTS, (0xA3, 0x0D): CommandClass.DEVICE_REPORTS,
    (0x15, None): CommandClass.MODE_LOG_DIAG, (0x55, None): CommandClass.MODE_LOG_DIAG,
    (0x1A, None): CommandClass.MODE_LOG_DIAG, (0x5A, None): CommandClass.MODE_LOG_DIAG,
    (0x4C, None): CommandClass.MODE_LOG_DIAG, (0x4D, None): CommandClass.MODE_LOG_DIAG,
    (0x1C, None): CommandClass.MODE_LOG_DIAG, (0x1D, None): CommandClass.MODE_LOG_DIAG,
}
READ_BUFFER, WRITE_BUFFER = 0x3C, 0x3B
ECHO_BUFFER_MODES = frozenset({0x0A, 0x0B})  # SPC-4 6.17.1/6.49.1: echo buffer (+ descriptor)


def command_class(cdb: bytes) -> CommandClass:
    op = cdb[0]
    if op in (0x5E, 0x5F):
        return CommandClass.RESERVATIONS
    if op in (READ_BUFFER, WRITE_BUFFER):
        return (CommandClass.ECHO_BUFFER if len(cdb) > 1 and cdb[1] & 0x1F in ECHO_BUFFER_MODES
                else CommandClass.OTHER)
    sa = cdb[1] & 0x1F if op in (0xA3, 0xA4) and len(cdb) > 1 else None
    return _BY_KEY.get((op, sa), CommandClass.OTHER)


A, N, S, U, OFF, T = (AccessState.ACTIVE_OPTIMIZED, AccessState.ACTIVE_NON_OPTIMIZED,
                    AccessState.STANDBY, AccessState.UNAVAILABLE, AccessState.OFFLINE,
                    AccessState.TRANSITIONING)

# THE TABLE: command class -> the states in which it is processed (SPC-4 sections above).
ALLOWED_IN: dict[CommandClass, frozenset[AccessState]] = {
    CommandClass.IDENTIFY: frozenset({A, N, S, U, OFF, T}),
    CommandClass.REPORT_TPG: frozenset({A, N, S, U, OFF, T}),
    CommandClass.SET_TPG: frozenset({A, N, S, U}),
    CommandClass.ECHO_BUFFER: frozenset({A, N, S, U, T}),
    CommandClass.DEVICE_REPORTS: frozenset({A, N, S, U}),
    CommandClass.MODE_LOG_DIAG: frozenset({A, N, S}),
    CommandClass.RESERVATIONS: frozenset({A, N, S}),
    CommandClass.OTHER: frozenset({A, N}),
}

# The sense a refused command ends with, per state (SPC-4 table of ASC/ASCQ, 04h/xx).
REFUSAL_SENSE: dict[AccessState, SenseData] = {
    AccessState.TRANSITIONING: SenseData(SenseKey.NOT_READY, 0x04, 0x0A),
    AccessState.STANDBY: SenseData(SenseKey.NOT_READY, 0x04, 0x0B),
    AccessState.UNAVAILABLE: SenseData(SenseKey.NOT_READY, 0x04, 0x0C),
    AccessState.OFFLINE: SenseData(SenseKey.NOT_READY, 0x04, 0x12),
}

# SPC-4 5.15.2.? / table of ASC/ASCQ: the unit attention after a state change.
ASYMMETRIC_ACCESS_STATE_CHANGED = (0x2A, 0x06)


def refusal(state: AccessState, cdb: bytes) -> SenseData | None:
    """None when a command ``cdb`` is processed through a port in ``state``, else its sense."""
    if state in (A, N):
        return None
    if state in ALLOWED_IN[command_class(cdb)]:
        return None
    return REFUSAL_SENSE[state]
