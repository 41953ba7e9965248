"""START STOP UNIT (SBC-3 5.25) and PREVENT ALLOW MEDIUM REMOVAL (SPC-4 6.13)."""

from __future__ import annotations

import logging

from .command import Command, CommandRows
from .sbc import medium_error
from .sense import invalid_field_in_cdb

ROWS = CommandRows()

log = logging.getLogger(__name__)


@ROWS.command(0x1B, None, "START STOP UNIT", "1b 01 00 0f f7 00")
async def start_stop_unit(cmd: Command) -> None:
    """POWER CONDITION 0 only (START_VALID); LOEJ rejected: the medium is not removable.

    Stopping flushes (unless NO_FLUSH) and makes medium-access commands fail with
    NOT READY, INITIALIZING COMMAND REQUIRED until a START UNIT.
    """
    lu = cmd.lu
    assert lu is not None
    b4 = cmd.cdb[4]
    if b4 >> 4:
        raise invalid_field_in_cdb(4, 7)
    if cmd.cdb[3] & 0x0F:
        raise invalid_field_in_cdb(3, 3)
    if b4 & 0x02:
        raise invalid_field_in_cdb(4, 1)
    start = bool(b4 & 0x01)
    if not start and not b4 & 0x04:
        try:
            await lu.backing.flush()
        except OSError as e:
            raise medium_error("write", e) from None
    if lu.stopped != (not start):
        log.info("LU %s %s by %s", lu.name, "started" if start else "stopped", cmd.initiator)
    lu.stopped = not start


@ROWS.command(0x1E, None, "PREVENT ALLOW MEDIUM REMOVAL", "1e 00 00 00 03 00")
async def prevent_allow_medium_removal(cmd: Command) -> None:
    """PREVENT 00b allow, 01b prevent (recorded per initiator); 10b/11b obsolete: rejected."""
    lu = cmd.lu
    assert lu is not None
    prevent = cmd.cdb[4] & 0x03
    if prevent > 1:
        raise invalid_field_in_cdb(4, 1)
    if prevent:
        lu.prevent_removal.add(cmd.initiator)
    else:
        lu.prevent_removal.discard(cmd.initiator)
