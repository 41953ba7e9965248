"""SBC-3 logical block provisioning: WRITE SAME (10/16), UNMAP, GET LBA STATUS.

Deallocation punches holes in the image (fallocate PUNCH_HOLE|KEEP_SIZE) or discards
on a block device; deallocated blocks read back as zeros (LBPRZ=1).
"""

from __future__ import annotations

import struct

import trio

from . import block_limits as bl
from .backing import write_pattern_sync
from .cdb import u16, u32, u64
from .command import Command, CommandRows
from .logical_unit import LogicalUnit
from .sbc import check_writable, medium_error
from .sense import (
    SenseError,
    SenseKey,
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
    lba_out_of_range,
    parameter_list_length_error,
)

ROWS = CommandRows()


async def deallocate(lu: LogicalUnit, lba: int, nblocks: int) -> None:
    try:
        await lu.backing.punch_hole(lba * lu.block_size, nblocks * lu.block_size)
    except OSError as e:
        raise medium_error("write", e) from None


async def write_same(cmd: Command, lba: int, nblocks: int, len_byte: int) -> None:
    """SBC-3 5.42/5.43. NUMBER OF LOGICAL BLOCKS 0 = to the end of the medium (WSNZ=0).

    UNMAP=1 deallocates the range whatever the data-out block holds (SBC-3: the device
    server "should" unmap; with LBPRZ=1 the blocks then read as zeros). This is what
    LIO does and what libiscsi's WriteSame*.Unmap* tests expect; QEMU instead writes
    a non-zero block. UNMAP=0 writes the block to every LBA.
    """
    lu = cmd.lu
    assert lu is not None
    c = cmd.cdb
    unmap = bool(c[1] & 0x08)
    ndob = c[0] == 0x93 and bool(c[1] & 0x01)
    check_writable(lu)
    if lba > lu.num_blocks:
        raise lba_out_of_range()
    if nblocks == 0:
        nblocks = lu.num_blocks - lba
    if nblocks > bl.MAX_WRITE_SAME_LENGTH:
        raise invalid_field_in_cdb(len_byte)
    if lba + nblocks > lu.num_blocks:
        raise lba_out_of_range()
    if not ndob and cmd.out_len and cmd.out_len != lu.block_size:
        # SBC-3 5.42: the data-out buffer is one logical block. A buffer of another size
        # means initiator and CDB disagree: refused (as LIO does) rather than guessed.
        raise SenseError(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
    block = bytes(lu.block_size) if ndob else cmd.receive(lu.block_size)
    if nblocks == 0:
        return
    async with lu.write_gate.shared():
        if unmap:
            await deallocate(lu, lba, nblocks)
        else:
            try:
                await trio.to_thread.run_sync(write_pattern_sync, lu.backing,
                                              lba * lu.block_size, block, nblocks)
            except OSError as e:
                raise medium_error("write", e) from None
        if not lu.mode.wce:
            await lu.backing.flush()


@ROWS.command(0x41, None, "WRITE SAME(10)", "41 08 ff ff ff ff 1f ff ff 00", medium=True)
async def write_same_10(cmd: Command) -> None:
    await write_same(cmd, u32(cmd.cdb, 2), u16(cmd.cdb, 7), 7)


@ROWS.command(0x93, None, "WRITE SAME(16)", "93 09 ff ff ff ff ff ff ff ff ff ff ff ff 1f 00",
         medium=True)
async def write_same_16(cmd: Command) -> None:
    await write_same(cmd, u64(cmd.cdb, 2), u32(cmd.cdb, 10), 10)


@ROWS.command(0x42, None, "UNMAP", "42 00 00 00 00 00 1f ff ff 00", medium=True)
async def unmap(cmd: Command) -> None:
    """SBC-3 5.28. Every descriptor is checked before any block is deallocated."""
    lu = cmd.lu
    assert lu is not None
    check_writable(lu)
    plen = u16(cmd.cdb, 7)
    if plen == 0:
        return
    if plen < 8:
        raise parameter_list_length_error()
    data = cmd.receive(plen)
    bd_len = min(u16(data, 2), plen - 8) // 16  # a truncated last descriptor is ignored
    if bd_len > bl.MAX_UNMAP_DESCRIPTORS:
        raise invalid_field_in_parameter_list(2)
    ranges: list[tuple[int, int]] = []
    total = 0
    for i in range(bd_len):
        off = 8 + 16 * i
        lba, count = struct.unpack_from(">QI", data, off)
        if lba + count > lu.num_blocks:
            raise lba_out_of_range()
        total += count
        if count:
            ranges.append((lba, count))
    if total > bl.MAX_UNMAP_LBA_COUNT:
        raise invalid_field_in_parameter_list(8 + 8)
    async with lu.write_gate.shared():
        for lba, count in ranges:
            await deallocate(lu, lba, count)


MAX_LBA_STATUS_DESCRIPTORS = 64


def lba_status(lu: LogicalUnit, lba: int, max_desc: int) -> list[tuple[int, int, int]]:
    """(lba, count, provisioning status 0 mapped / 1 deallocated) from SEEK_DATA/SEEK_HOLE.

    A block partly holding data counts as mapped.
    """
    bs = lu.block_size
    end = lu.num_blocks
    merged: list[list[int]] = []
    cur = lba
    while cur < end and len(merged) <= max_desc:
        mapped, length = lu.backing.mapped_extent(cur * bs)
        stop = cur * bs + length
        nxt = min(end, -(-stop // bs)) if mapped else min(end, stop // bs)
        if nxt <= cur:  # a hole smaller than a block: the block has data
            mapped, nxt = True, cur + 1
        status = 0 if mapped else 1
        if merged and merged[-1][2] == status:
            merged[-1][1] += nxt - cur
        else:
            merged.append([cur, nxt - cur, status])
        cur = nxt
    out: list[tuple[int, int, int]] = []
    for start, count, status in merged:
        while count > 0 and len(out) < max_desc:
            n = min(count, 0xFFFFFFFF)
            out.append((start, n, status))
            start += n
            count -= n
    return out


@ROWS.command(0x9E, 0x12, "GET LBA STATUS", "9e 12 ff ff ff ff ff ff ff ff ff ff ff ff 00 00",
         medium=True)
async def get_lba_status(cmd: Command) -> None:
    """SBC-3 5.4."""
    lu = cmd.lu
    assert lu is not None
    lba, alloc = u64(cmd.cdb, 2), u32(cmd.cdb, 10)
    if lba >= lu.num_blocks:
        raise lba_out_of_range()
    max_desc = max(1, min(MAX_LBA_STATUS_DESCRIPTORS, (alloc - 8) // 16))
    descs = await trio.to_thread.run_sync(lba_status, lu, lba, max_desc)
    body = b"".join(struct.pack(">QIB3x", a, n, s) for a, n, s in descs)
    cmd.send(struct.pack(">I4x", len(body) + 4) + body, alloc)
