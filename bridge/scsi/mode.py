"""MODE SENSE (6/10) and MODE SELECT (6/10): SPC-4 6.11-6.14, 7.5."""

from __future__ import annotations

import logging
import struct

from .cdb import u16
from .command import Command, CommandRows
from .logical_unit import LogicalUnit
from .mode_pages import ALL_PAGES, PAGE_ORDER, ModeParameters
from .sense import (
    SenseError,
    SenseKey,
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
    parameter_list_length_error,
)
from .unit_attention import MODE_PARAMETERS_CHANGED

ROWS = CommandRows()

log = logging.getLogger(__name__)


def device_specific_parameter(lu: LogicalUnit) -> int:
    """SBC-3 6.4.1: WP (bit 7) for read-only LUs, DPOFUA (bit 4)."""
    return (0x80 if lu.read_only else 0) | 0x10


def block_descriptor(lu: LogicalUnit, long_lba: bool, pc: int) -> bytes:
    """SBC-3 6.4.2: short (8 bytes) or long LBA (16 bytes) mode parameter block descriptor.
    Changeable values (pc 1): nothing is changeable, all zeros."""
    blocks = lu.num_blocks if pc != 1 else 0
    bs = lu.block_size if pc != 1 else 0
    if long_lba:
        return struct.pack(">Q4xI", blocks, bs)
    return struct.pack(">IB", min(blocks, 0xFFFFFFFF), 0) + bs.to_bytes(3, "big")


def select_pages(cdb: bytes) -> list[int]:
    """Page codes asked for by a MODE SENSE CDB (byte 2 page code, byte 3 subpage)."""
    page, sub = cdb[2] & 0x3F, cdb[3]
    if page == ALL_PAGES:
        if sub not in (0x00, 0xFF):
            raise invalid_field_in_cdb(3)
        return list(PAGE_ORDER)
    if not ModeParameters.known(page):
        raise invalid_field_in_cdb(2, 5)
    if sub not in (0x00, 0xFF):  # we have no subpages; FFh = the page and its subpages
        raise invalid_field_in_cdb(3)
    return [page]


async def mode_sense(cmd: Command, ten: bool) -> None:
    lu = cmd.lu
    assert lu is not None
    c = cmd.cdb
    dbd = bool(c[1] & 0x08)
    llbaa = ten and bool(c[1] & 0x10)
    pc = c[2] >> 6
    pages = b"".join(lu.mode.page(p, pc) for p in select_pages(c))
    bd = b"" if dbd else block_descriptor(lu, llbaa, pc)
    dsp = device_specific_parameter(lu)
    if ten:
        total = 8 + len(bd) + len(pages)
        header = struct.pack(">HBBBBH", total - 2, 0, dsp, 0x01 if llbaa and bd else 0, 0, len(bd))
        cmd.send(header + bd + pages, u16(c, 7))
    else:
        total = 4 + len(bd) + len(pages)
        header = bytes((total - 1, 0, dsp, len(bd)))
        cmd.send(header + bd + pages, c[4])


@ROWS.command(0x1A, None, "MODE SENSE(6)", "1a 08 ff ff ff 00")
async def mode_sense_6(cmd: Command) -> None:
    await mode_sense(cmd, ten=False)


@ROWS.command(0x5A, None, "MODE SENSE(10)", "5a 18 ff ff 00 00 00 ff ff 00")
async def mode_sense_10(cmd: Command) -> None:
    await mode_sense(cmd, ten=True)


def parse_mode_select(lu: LogicalUnit, data: bytes, ten: bool, pf: bool) -> dict[int, bytes]:
    """Validate a MODE SELECT parameter list; returns the new pages. Nothing is applied.

    SPC-4 6.13: fields that are not changeable must hold their current value
    (INVALID FIELD IN PARAMETER LIST pointing at the byte and bit).
    """
    hlen = 8 if ten else 4
    if len(data) < hlen:
        raise parameter_list_length_error()
    if data[1]:  # MEDIUM TYPE: 0 for direct-access devices
        raise invalid_field_in_parameter_list(1)
    if ten:
        long_lba = bool(data[4] & 0x01)
        bd_len = u16(data, 6)
    else:
        long_lba = False
        bd_len = data[3]
    want_bd = 16 if long_lba else 8
    if bd_len not in (0, want_bd):
        raise invalid_field_in_parameter_list(6 if ten else 3)
    if hlen + bd_len > len(data):
        raise parameter_list_length_error()
    if bd_len:
        bd = data[hlen : hlen + bd_len]
        if long_lba:
            blocks, bs = struct.unpack(">Q4xI", bd)
            bs_off = hlen + 12
        else:
            blocks, bs = struct.unpack(">I", bd[:4])[0], int.from_bytes(bd[5:8], "big")
            bs_off = hlen + 5
        if bs != lu.block_size:
            raise invalid_field_in_parameter_list(bs_off)
        if blocks not in (0, lu.num_blocks, min(lu.num_blocks, 0xFFFFFFFF)):
            raise invalid_field_in_parameter_list(hlen)
    off = hlen + bd_len
    new: dict[int, bytes] = {}
    if off < len(data) and not pf:
        raise SenseError(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)  # vendor-specific pages: none
    while off < len(data):
        if off + 2 > len(data):
            raise parameter_list_length_error()
        code = data[off] & 0x3F
        if data[off] & 0x40:  # SPF: no subpages here
            raise invalid_field_in_parameter_list(off, 6)
        if not ModeParameters.known(code):
            raise invalid_field_in_parameter_list(off, 5)
        plen = data[off + 1]
        if plen + 2 != ModeParameters.length(code):
            raise invalid_field_in_parameter_list(off + 1)
        if off + 2 + plen > len(data):
            raise parameter_list_length_error()
        page = bytes((code,)) + data[off + 1 : off + 2 + plen]  # PS bit ignored
        current = lu.mode.current[code]
        mask = ModeParameters.changeable(code)
        for i in range(2, len(page)):
            bad = (page[i] ^ current[i]) & ~mask[i]
            if bad:
                raise invalid_field_in_parameter_list(off + i, bad.bit_length() - 1)
        new[code] = page
        off += 2 + plen
    return new


async def mode_select(cmd: Command, plen: int, ten: bool) -> None:
    lu = cmd.lu
    assert lu is not None
    c = cmd.cdb
    pf, sp = bool(c[1] & 0x10), bool(c[1] & 0x01)
    if plen == 0:
        return
    data = cmd.receive(plen)
    new = parse_mode_select(lu, data, ten, pf)
    async with lu.mode_changes:  # one MODE SELECT at a time: saves land in order
        changed = any(bytes(lu.mode.current[code]) != page for code, page in new.items())
        if sp:
            try:
                await lu.save_mode_pages({**lu.mode.saved, **new})
            except OSError as e:
                log.error("LU %s: cannot save mode pages: %s", lu.name, e)
                raise SenseError(SenseKey.HARDWARE_ERROR, 0x44, 0x00) from None
        was_wce = lu.mode.wce
        for code, page in new.items():
            lu.mode.current[code][:] = page
        if was_wce and not lu.mode.wce:
            await lu.backing.flush()  # SBC-3 6.4.5: cached data reach the medium
    if changed:
        log.info("LU %s: mode parameters changed by %s (WCE=%d D_SENSE=%d)", lu.name,
                 cmd.initiator, lu.mode.wce, lu.mode.d_sense)
        # SPC-4 7.5.1: MODE PARAMETERS CHANGED for every other I_T nexus.
        for initiator, _lun in cmd.target.nexuses_of(lu.name):
            if initiator != cmd.initiator:
                cmd.target.unit_attentions.establish(initiator, lu.name, MODE_PARAMETERS_CHANGED)


@ROWS.command(0x15, None, "MODE SELECT(6)", "15 11 00 00 ff 00")
async def mode_select_6(cmd: Command) -> None:
    await mode_select(cmd, cmd.cdb[4], ten=False)


@ROWS.command(0x55, None, "MODE SELECT(10)", "55 11 00 00 00 00 00 ff ff 00")
async def mode_select_10(cmd: Command) -> None:
    await mode_select(cmd, u16(cmd.cdb, 7), ten=True)

