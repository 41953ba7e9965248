"""REPORT SUPPORTED OPERATION CODES (SPC-4 6.35) and REPORT SUPPORTED TASK MANAGEMENT
FUNCTIONS (SPC-4 6.36), both answered from the dispatch table."""

from __future__ import annotations

import struct

from .cdb import SERVICE_ACTION_OPCODES, u16, u32
from .command import Command, CommandInfo, CommandRows
from .sense import invalid_field_in_cdb
from .task_management import supported_tmf_flags

ROWS = CommandRows()

# SPC-4 6.35.4 command timeouts descriptor: nominal and recommended timeouts (seconds).
NOMINAL_TIMEOUT = 0  # not specified
RECOMMENDED_TIMEOUT = 30


def timeouts_descriptor() -> bytes:
    return struct.pack(">HBBII", 0x0A, 0, 0, NOMINAL_TIMEOUT, RECOMMENDED_TIMEOUT)


def command_descriptor(info: CommandInfo, rctd: bool) -> bytes:
    """SPC-4 6.35.3 table 250: 8 bytes (+12 with the timeouts descriptor)."""
    flags = (0x02 if rctd else 0) | (0x01 if info.service_action is not None else 0)
    d = struct.pack(">BBHBBH", info.opcode, 0, info.service_action or 0, 0, flags,
                    info.cdb_length)
    return d + (timeouts_descriptor() if rctd else b"")


def one_command(info: CommandInfo | None, rctd: bool) -> bytes:
    """SPC-4 6.35.4 table 252: SUPPORT 011b (supported) with the CDB usage data, or 001b."""
    if info is None:
        return bytes((0, 0x01, 0, 0))
    d = bytes((0, (0x80 if rctd else 0) | 0x03)) + struct.pack(">H", info.cdb_length)
    return d + info.usage + (timeouts_descriptor() if rctd else b"")


@ROWS.command(0xA3, 0x0C, "REPORT SUPPORTED OPERATION CODES", "a3 1f 87 ff ff ff ff ff ff ff 00 00")
async def report_supported_operation_codes(cmd: Command) -> None:
    c = cmd.cdb
    rctd = bool(c[2] & 0x80)
    option = c[2] & 0x07
    op, sa = c[3], u16(c, 4)
    alloc = u32(c, 6)
    table = cmd.target.commands  # the table this command was dispatched through
    if option == 0:
        body = b"".join(command_descriptor(i, rctd) for i in table.rows())
        cmd.send(struct.pack(">I", len(body)) + body, alloc)
        return
    if option == 1:
        if op in SERVICE_ACTION_OPCODES:
            raise invalid_field_in_cdb(2, 2)
        cmd.send(one_command(table.get((op, None)), rctd), alloc)
        return
    if option == 2:
        if op not in SERVICE_ACTION_OPCODES:
            raise invalid_field_in_cdb(2, 2)
        cmd.send(one_command(table.get((op, sa)) if sa <= 0x1F else None, rctd), alloc)
        return
    if option == 3:  # SPC-4 r37: with or without a service action, no error
        key = (op, sa) if op in SERVICE_ACTION_OPCODES else (op, None)
        if op not in SERVICE_ACTION_OPCODES and sa:
            cmd.send(one_command(None, rctd), alloc)
            return
        cmd.send(one_command(table.get(key), rctd), alloc)
        return
    raise invalid_field_in_cdb(2, 2)


@ROWS.command(0xA3, 0x0D, "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS",
         "a3 1f 80 00 00 00 ff ff ff ff 00 00")
async def report_supported_tmfs(cmd: Command) -> None:
    repd = bool(cmd.cdb[2] & 0x80)
    alloc = u32(cmd.cdb, 6)
    # SPC-4 6.38: the flags come from the table the TMFs are dispatched through.
    flags = supported_tmf_flags()
    data = flags + (bytes((0, 0x0C)) + bytes(12) if repd else bytes(2))
    cmd.send(data, alloc)
