"""SBC-3 commands about the cache and the medium's defects: PRE-FETCH (10/16),
READ DEFECT DATA (10/12)."""

from __future__ import annotations

import os
import struct

import trio

from .cdb import u16, u32, u64
from .command import Command, CommandRows
from .sense import invalid_field_in_cdb, lba_out_of_range

ROWS = CommandRows()


async def pre_fetch(cmd: Command, lba: int, nblocks: int) -> None:
    """SBC-3 5.8/5.9: ask the host page cache to read the range (posix_fadvise WILLNEED).

    The advice starts readahead and returns; it does not say the blocks reached the
    cache, nor that they stay there (the cache is the host's). CONDITION MET would
    claim they did, so the answer is GOOD, which SBC-3 gives when not every block is
    known to be in the cache. (Linux's SG_IO also counts CONDITION MET as an error
    status, masked_status, so an initiator there would see a failure.)
    A TRANSFER LENGTH of 0 means up to the end of the medium. IMMED is accepted:
    the advice is immediate either way.
    """
    lu = cmd.lu
    assert lu is not None
    if lba > lu.num_blocks or lba + nblocks > lu.num_blocks:
        raise lba_out_of_range()
    if nblocks == 0:
        nblocks = lu.num_blocks - lba
        if nblocks == 0:
            return
    # In a worker thread: submitting readahead can wait on the file's metadata.
    await trio.to_thread.run_sync(os.posix_fadvise, lu.backing.fd, lba * lu.block_size,
                                  nblocks * lu.block_size, os.POSIX_FADV_WILLNEED)


@ROWS.command(0x34, None, "PRE-FETCH(10)", "34 02 ff ff ff ff 1f ff ff 00", medium=True)
async def pre_fetch_10(cmd: Command) -> None:
    await pre_fetch(cmd, u32(cmd.cdb, 2), u16(cmd.cdb, 7))


@ROWS.command(0x90, None, "PRE-FETCH(16)", "90 02 ff ff ff ff ff ff ff ff ff ff ff ff 1f 00",
              medium=True)
async def pre_fetch_16(cmd: Command) -> None:
    await pre_fetch(cmd, u64(cmd.cdb, 2), u32(cmd.cdb, 10))


# SBC-3 6.2: defect list formats. 111b is reserved; the others name a descriptor
# format, and an empty list is the same in all of them.
RESERVED_DEFECT_LIST_FORMAT = 0x7


def defect_flags(cmd: Command, byte: int) -> int:
    """REQ_PLIST / REQ_GLIST / DEFECT LIST FORMAT from ``byte``, echoed in the header
    (SBC-3 5.19: PLISTV/GLISTV one = that list is returned, here empty)."""
    flags = cmd.cdb[byte]
    if flags & 0x07 == RESERVED_DEFECT_LIST_FORMAT:
        raise invalid_field_in_cdb(byte, 2)
    return flags & 0x1F


@ROWS.command(0x37, None, "READ DEFECT DATA(10)", "37 00 1f 00 00 00 00 ff ff 00", medium=True)
async def read_defect_data_10(cmd: Command) -> None:
    """SBC-3 5.19: a file-backed LU has no defects: the lists asked for, empty."""
    flags = defect_flags(cmd, 2)
    cmd.send(struct.pack(">BBH", 0, flags, 0), u16(cmd.cdb, 7))


@ROWS.command(0xB7, None, "READ DEFECT DATA(12)", "b7 1f ff ff ff ff ff ff ff ff 00 00",
              medium=True)
async def read_defect_data_12(cmd: Command) -> None:
    """SBC-3 5.20 / SBC-4 (ADDRESS DESCRIPTOR INDEX in bytes 2-5: any index of an
    empty list returns the header alone)."""
    flags = defect_flags(cmd, 1)
    cmd.send(struct.pack(">BBHI", 0, flags, 0, 0), u32(cmd.cdb, 6))
