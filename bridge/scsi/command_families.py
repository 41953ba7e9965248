"""The command families the target dispatches, declared in one list.

Each family is a handler module exporting ``ROWS`` (a ``CommandRows``); the dispatch
table is built from exactly these. A handler module left out of FAMILIES has no rows
in the table (tests/unit/scsi/test_command_families.py finds such a module).
"""

from __future__ import annotations

from types import ModuleType

from . import (
    mode,
    rsoc,
    sbc,
    sbc_atomic,
    sbc_cache,
    sbc_provisioning,
    sbc_sanitize,
    sbc_verify,
    spc,
    spc_xcopy,
    target_port_groups,
    unit_state,
)
from .command import CommandTable
from .reservations import commands as reservation_commands

FAMILIES: tuple[ModuleType, ...] = (
    spc,  # TEST UNIT READY, INQUIRY, REQUEST SENSE, REPORT LUNS (SPC-4)
    mode,  # MODE SENSE/SELECT(6/10) (SPC-4 6.11-6.14)
    unit_state,  # START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL (SBC-3, SPC-4)
    sbc,  # READ/WRITE, READ CAPACITY, SYNCHRONIZE CACHE (SBC-3)
    sbc_verify,  # VERIFY, WRITE AND VERIFY, COMPARE AND WRITE (SBC-3)
    sbc_provisioning,  # WRITE SAME, UNMAP, GET LBA STATUS (SBC-3 4.7)
    sbc_atomic,  # ORWRITE(16), WRITE ATOMIC(16) (SBC-3, SBC-4)
    sbc_cache,  # PRE-FETCH(10/16), READ DEFECT DATA(10/12) (SBC-3)
    sbc_sanitize,  # SANITIZE: OVERWRITE, BLOCK ERASE, EXIT FAILURE MODE (SBC-3 5.21)
    spc_xcopy,  # EXTENDED COPY (LID1), RECEIVE COPY RESULTS (SPC-4 6.4, 6.18)
    rsoc,  # REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS (SPC-4)
    reservation_commands,  # PERSISTENT RESERVE IN/OUT, RESERVE/RELEASE(6/10)
    target_port_groups,  # REPORT/SET TARGET PORT GROUPS (SPC-4 6.37, 6.45; ALUA 5.15)
)


def build_table(families: tuple[ModuleType, ...] = FAMILIES) -> CommandTable:
    return CommandTable(family.ROWS for family in families)


COMMAND_TABLE = build_table()
