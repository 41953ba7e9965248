"""Dispatch rows for PERSISTENT RESERVE IN/OUT (SPC-4 6.15, 6.16) and SPC-2
RESERVE/RELEASE (6/10): all handled by the LU's PersistentReservations."""

from __future__ import annotations

from ..cdb import u16, u32
from ..command import Command, CommandRows
from ..sense import parameter_list_length_error
from ..task_set import TaskSet
from .persistent_reservations import ReservationConflict

ROWS = CommandRows()

# Bounds what a guest can make us gather into memory: 24 bytes plus TransportIDs.
MAX_PR_OUT_PARAMETER_LIST = 64 << 10


class ReservationConflictStatus(Exception):
    """The core answers RESERVATION CONFLICT (18h), no sense data."""


async def persistent_reservation(cmd: Command) -> None:
    lu = cmd.lu
    assert lu is not None
    c = cmd.cdb
    op = c[0]
    data_out = b""
    alloc = 0
    if op == 0x5E:
        alloc = u16(c, 7)
    elif op == 0x5F:
        plen = u32(c, 5)
        if plen > MAX_PR_OUT_PARAMETER_LIST:
            raise parameter_list_length_error()
        data_out = cmd.receive(plen)
    try:
        data_in, abort = await lu.reservations.handle(cmd.req.initiator, c, data_out, alloc)
    except ReservationConflict:
        raise ReservationConflictStatus from None
    if data_in:
        cmd.send(data_in, alloc)
    if abort:
        # SPC-4 5.13.11.2.4 PREEMPT AND ABORT: the preempted nexuses' tasks end ABORTED
        # (this command excepted) before the PERSISTENT RESERVE OUT completes.
        tasks = [t for ini in abort for t in lu.tasks.matching(ini)
                 if not (t.initiator == cmd.initiator and t.tag == cmd.req.tag)]
        await TaskSet.abort(tasks)


for _sa in range(4):  # READ KEYS, READ RESERVATION, REPORT CAPABILITIES, READ FULL STATUS
    ROWS.command(0x5E, _sa, f"PERSISTENT RESERVE IN/{_sa:02x}h",
            "5e 1f 00 00 00 00 00 ff ff 00")(persistent_reservation)
for _sa in range(8):  # REGISTER ... REGISTER AND MOVE (SPC-4 table 226)
    ROWS.command(0x5F, _sa, f"PERSISTENT RESERVE OUT/{_sa:02x}h",
            "5f 1f ff 00 00 ff ff ff ff 00")(persistent_reservation)
ROWS.command(0x16, None, "RESERVE(6)", "16 13 00 00 00 00")(persistent_reservation)
ROWS.command(0x17, None, "RELEASE(6)", "17 13 00 00 00 00")(persistent_reservation)
ROWS.command(0x56, None, "RESERVE(10)", "56 13 ff 00 00 00 00 ff ff 00")(persistent_reservation)
ROWS.command(0x57, None, "RELEASE(10)", "57 13 ff 00 00 00 00 ff ff 00")(persistent_reservation)
