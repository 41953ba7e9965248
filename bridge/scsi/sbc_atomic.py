"""SBC-3/SBC-4 writes that must not interleave with other commands: ORWRITE(16) and
WRITE ATOMIC(16).

Both run with the LU's write gate held exclusively (io_gate.py), as COMPARE AND WRITE
does: no other write, and no READ (reads enter the gate shared), sees or changes the
range half-way. Across a host crash a file-backed LU is as atomic as the host file
system makes a pwritev; the Block Limits page advertises no more than the transfer
limit, no alignment or granularity constraint, and no atomic boundary.
"""

from __future__ import annotations

from . import block_limits as bl
from .cdb import u16, u32, u64
from .command import Command, CommandRows
from .sbc import check_range, check_writable, medium_error
from .sbc_verify import read_medium
from .sense import invalid_field_in_cdb

ROWS = CommandRows()


def sync_requested(cmd: Command) -> bool:
    """SBC-3 4.13: FUA, or the write cache disabled (WCE=0), writes through."""
    lu = cmd.lu
    assert lu is not None
    return bool(cmd.cdb[1] & 0x08) or not lu.mode.wce


@ROWS.command(0x8B, None, "ORWRITE(16)", "8b 18 ff ff ff ff ff ff ff ff ff ff ff ff 1f 00",
              medium=True)
async def orwrite_16(cmd: Command) -> None:
    """SBC-3 5.12: each block becomes (medium OR data-out), read-OR-write uninterrupted.

    ORPROTECT (byte 1 bits 7-5) is rejected: no protection information.
    """
    lu = cmd.lu
    assert lu is not None
    lba, nblocks = u64(cmd.cdb, 2), u32(cmd.cdb, 10)
    check_writable(lu)
    check_range(cmd, lba, nblocks, 10)
    if nblocks == 0:
        return
    n = nblocks * lu.block_size
    views = cmd.out_views(n)
    async with lu.write_gate.exclusive():
        medium = await read_medium(lu, lba, nblocks)
        pos = 0
        for v in views:
            k = len(v)
            medium[pos : pos + k] = (int.from_bytes(medium[pos : pos + k], "little")
                                     | int.from_bytes(v, "little")).to_bytes(k, "little")
            pos += k
        try:
            await lu.backing.write_from(lba * lu.block_size, [memoryview(medium)],
                                        sync=sync_requested(cmd))
        except OSError as e:
            raise medium_error("write", e) from None


def max_atomic_blocks(cmd: Command) -> int:
    """SBC-4 6.6.4 MAXIMUM ATOMIC TRANSFER LENGTH: the path's transfer limit."""
    lu = cmd.lu
    assert lu is not None
    return bl.max_transfer_blocks(cmd.req.target_port, lu.block_size)


@ROWS.command(0x9C, None, "WRITE ATOMIC(16)", "9c 18 ff ff ff ff ff ff ff ff 00 00 ff ff 1f 00",
              medium=True)
async def write_atomic_16(cmd: Command) -> None:
    """SBC-4 5.48: the whole range is written, or (on an error) none of it is seen
    changed by another command. ATOMIC BOUNDARY (bytes 10-11) must be zero: the
    Block Limits page's MAXIMUM ATOMIC BOUNDARY SIZE is 0 (reserved-bit check)."""
    lu = cmd.lu
    assert lu is not None
    lba, nblocks = u64(cmd.cdb, 2), u16(cmd.cdb, 12)
    check_writable(lu)
    if nblocks > max_atomic_blocks(cmd):
        raise invalid_field_in_cdb(12)
    check_range(cmd, lba, nblocks, 12)
    if nblocks == 0:
        return
    views = cmd.out_views(nblocks * lu.block_size)
    async with lu.write_gate.exclusive():
        try:
            await lu.backing.write_from(lba * lu.block_size, views, sync=sync_requested(cmd))
        except OSError as e:
            raise medium_error("write", e) from None
