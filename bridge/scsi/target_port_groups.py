"""REPORT TARGET PORT GROUPS (SPC-4 6.37) and SET TARGET PORT GROUPS (SPC-4 6.45)."""

from __future__ import annotations

import struct

from .alua import STPG_SETTABLE, AccessState
from .cdb import u32
from .command import Command, CommandRows
from .ports import PortGroup, change_states
from .sense import (
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
    parameter_list_length_error,
)

ROWS = CommandRows()

# SPC-4 6.37 target port group descriptor byte 1: the states we support.
T_SUP, O_SUP, U_SUP, S_SUP, AN_SUP, AO_SUP = 0x80, 0x40, 0x08, 0x04, 0x02, 0x01
SUPPORTED_STATES = T_SUP | O_SUP | U_SUP | S_SUP | AN_SUP | AO_SUP
FORMAT_LENGTH_ONLY, FORMAT_EXTENDED = 0b000, 0b001
MAX_STPG_PARAMETER_LIST = 4 + 4 * 1024


def groups_for(cmd: Command) -> list[PortGroup]:
    """The groups with a port through which this LU is reached (every group of the target
    when the LU is mapped through none, as in a single-port set-up)."""
    ports = cmd.target.ports
    assert cmd.lu is not None
    rids = {ports.relative_id_of(ini) for ini, _lun in cmd.target.nexuses_of(cmd.lu.name)}
    rids.add(cmd.port.relative_id)
    groups = [g for g in ports.groups.values() if any(p.relative_id in rids for p in g.ports)]
    return sorted(groups, key=lambda g: g.id)


def descriptor(group: PortGroup) -> bytes:
    """SPC-4 6.37 table: target port group descriptor."""
    b0 = (0x80 if group.preferred else 0) | int(group.state)
    head = struct.pack(">BBHBBBB", b0, SUPPORTED_STATES, group.id, 0, group.status, 0,
                       len(group.ports))
    return head + b"".join(struct.pack(">HH", 0, p.relative_id)
                           for p in sorted(group.ports, key=lambda p: p.relative_id))


@ROWS.command(0xA3, 0x0A, "REPORT TARGET PORT GROUPS", "a3 ff 00 00 00 00 ff ff ff ff 00 00")
async def report_target_port_groups(cmd: Command) -> None:
    """SPC-4 6.37: length-only (000b) or extended header (001b) parameter data."""
    fmt = cmd.cdb[1] >> 5
    alloc = u32(cmd.cdb, 6)
    body = b"".join(descriptor(g) for g in groups_for(cmd))
    if fmt == FORMAT_LENGTH_ONLY:
        data = struct.pack(">I", len(body)) + body
    elif fmt == FORMAT_EXTENDED:
        ext = struct.pack(">BBH", FORMAT_EXTENDED << 4,
                          min(cmd.target.ports.implicit_transition_time, 255), 0)
        data = struct.pack(">I", len(ext) + len(body)) + ext + body
    else:
        raise invalid_field_in_cdb(1, 7)
    cmd.send(data, alloc)


@ROWS.command(0xA4, 0x0A, "SET TARGET PORT GROUPS", "a4 1f 00 00 00 00 ff ff ff ff 00 00")
async def set_target_port_groups(cmd: Command) -> None:
    """SPC-4 6.45: a 4-byte header, then (state, group id) descriptors; all or nothing."""
    plen = u32(cmd.cdb, 6)
    if plen == 0:
        return
    if plen < 4 or plen % 4 or plen > MAX_STPG_PARAMETER_LIST:
        raise parameter_list_length_error()
    data = cmd.receive(plen)
    ports = cmd.target.ports
    changes: dict[PortGroup, AccessState] = {}
    for off in range(4, plen, 4):
        raw_state = data[off] & 0x0F
        if data[off] & 0xF0:
            raise invalid_field_in_parameter_list(off, 7)
        try:
            state = AccessState(raw_state)
        except ValueError:
            raise invalid_field_in_parameter_list(off, 3) from None
        if state not in STPG_SETTABLE:
            raise invalid_field_in_parameter_list(off, 3)
        (gid,) = struct.unpack_from(">H", data, off + 2)
        group = ports.group_by_id(gid)
        if group is None or group in changes:
            # SPC-4 6.45: an unknown group, or one named twice.
            raise invalid_field_in_parameter_list(off + 2)
        changes[group] = state
    change_states(cmd.target, changes, origin=cmd.initiator)
