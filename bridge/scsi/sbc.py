"""SBC-3 block commands: READ CAPACITY, READ and WRITE (6/10/12/16)."""

from __future__ import annotations

import errno
import logging
import struct

from . import block_limits as bl
from .cdb import invalid_transfer_length, u16, u24, u32, u64
from .command import Command, CommandRows
from .logical_unit import LogicalUnit
from .sense import SenseError, SenseKey, invalid_field_in_cdb, lba_out_of_range, write_protected

ROWS = CommandRows()

log = logging.getLogger(__name__)


def check_range(cmd: Command, lba: int, nblocks: int, len_byte: int) -> None:
    """SBC-3 4.5: transfer length within the block limits of the path (the Block
    Limits VPD page's MAXIMUM TRANSFER LENGTH), LBA range on the medium."""
    lu = cmd.lu
    assert lu is not None
    if nblocks > bl.max_transfer_blocks(cmd.req.target_port, lu.block_size):
        raise invalid_transfer_length(len_byte)
    if lba + nblocks > lu.num_blocks:
        raise lba_out_of_range()


def check_writable(lu: LogicalUnit) -> None:
    if lu.read_only:
        raise write_protected()


def medium_error(op: str, e: OSError) -> SenseError:
    """Backing store I/O error -> MEDIUM ERROR (or DATA PROTECT when the space ran out)."""
    log.error("%s failed: %s", op, e)
    if e.errno == errno.ENOSPC:
        return SenseError(SenseKey.DATA_PROTECT, 0x27, 0x07)  # SPACE ALLOCATION FAILED WRITE PROTECT
    if op == "read":
        return SenseError(SenseKey.MEDIUM_ERROR, 0x11, 0x00)  # UNRECOVERED READ ERROR
    return SenseError(SenseKey.MEDIUM_ERROR, 0x0C, 0x00)  # WRITE ERROR


async def do_read(cmd: Command, lba: int, nblocks: int, len_byte: int) -> None:
    lu = cmd.lu
    assert lu is not None
    check_range(cmd, lba, nblocks, len_byte)
    if nblocks == 0:
        return
    views = cmd.in_views(nblocks * lu.block_size)
    try:
        # Shared: not while COMPARE AND WRITE, ORWRITE or WRITE ATOMIC hold the range.
        async with lu.write_gate.shared():
            await lu.backing.read_into(lba * lu.block_size, views)
    except OSError as e:
        raise medium_error("read", e) from None


async def do_write(cmd: Command, lba: int, nblocks: int, len_byte: int, fua: bool) -> None:
    lu = cmd.lu
    assert lu is not None
    check_writable(lu)
    check_range(cmd, lba, nblocks, len_byte)
    if nblocks == 0:
        return
    views = cmd.out_views(nblocks * lu.block_size)
    try:
        # SBC-3 4.13 / 5.29: FUA or WCE=0 -> the data reach stable storage before GOOD.
        async with lu.write_gate.shared():
            await lu.backing.write_from(lba * lu.block_size, views, sync=fua or not lu.mode.wce)
    except OSError as e:
        raise medium_error("write", e) from None


# -- READ CAPACITY -----------------------------------------------------------------------


@ROWS.command(0x25, None, "READ CAPACITY(10)", "25 00 ff ff ff ff 00 00 01 00")
async def read_capacity_10(cmd: Command) -> None:
    """SBC-3 5.16: RETURNED LBA is FFFFFFFFh when the capacity needs READ CAPACITY(16)."""
    lu = cmd.lu
    assert lu is not None
    if not cmd.cdb[8] & 0x01 and u32(cmd.cdb, 2):
        raise invalid_field_in_cdb(2)  # PMI=0 requires LOGICAL BLOCK ADDRESS 0
    last = min(lu.num_blocks - 1, 0xFFFFFFFF)
    cmd.send(struct.pack(">II", last, lu.block_size), 8)


@ROWS.command(0x9E, 0x10, "READ CAPACITY(16)", "9e 10 ff ff ff ff ff ff ff ff ff ff ff ff 01 00")
async def read_capacity_16(cmd: Command) -> None:
    """SBC-3 5.17: LBPME=1 (thin provisioned, UNMAP supported), LBPRZ, the physical
    block exponent."""
    lu = cmd.lu
    assert lu is not None
    if not cmd.cdb[14] & 0x01 and u64(cmd.cdb, 2):
        raise invalid_field_in_cdb(2)
    # Byte 13: LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT; bytes 14-15: LBPME, LBPRZ and
    # LOWEST ALIGNED LOGICAL BLOCK ADDRESS 0 (LBA 0 starts a physical block).
    lbp = 0x8000 | (0x4000 if lu.lbprz else 0)
    data = struct.pack(">QIBBH", lu.num_blocks - 1, lu.block_size, 0, lu.lbppb_exponent,
                       lbp) + bytes(16)
    cmd.send(data, u32(cmd.cdb, 10))


# -- READ / WRITE ------------------------------------------------------------------------
# Byte 1: DPO (bit 4) and FUA (bit 3) accepted; RDPROTECT/WRPROTECT (7-5) rejected as we
# have no protection information. GROUP NUMBER (bits 4-0 of its byte) accepted, ignored.


_RW10 = struct.Struct(">2xIxHx")  # LOGICAL BLOCK ADDRESS, TRANSFER LENGTH
_RW12 = struct.Struct(">2xII2x")
_RW16 = struct.Struct(">2xQI2x")


def rw_fields(cdb: bytes) -> tuple[int, int, int]:
    """(LBA, TRANSFER LENGTH, offset of the length field) of READ/WRITE 6/10/12/16
    (``cdb`` as check_cdb returns it: exactly the opcode's length).

    SBC-3 5.11/5.39: a READ(6)/WRITE(6) TRANSFER LENGTH of 0 means 256 blocks.
    """
    group = cdb[0] >> 5
    if group == 1:
        return (*_RW10.unpack_from(cdb), 7)
    if group == 0:
        return u24(cdb, 1) & 0x1FFFFF, cdb[4] or 256, 4
    if group == 5:
        return (*_RW12.unpack_from(cdb), 6)
    return (*_RW16.unpack_from(cdb), 10)


def fua(cdb: bytes) -> bool:
    return cdb[0] != 0x0A and bool(cdb[1] & 0x08)


def read_fast(cmd: Command) -> bool:
    """Page-cache hit: the whole READ inline (RWF_NOWAIT), no task, no cancel scope."""
    lu = cmd.lu
    assert lu is not None
    cdb = cmd.cdb
    if cdb[0] == 0x28:  # READ(10), what Linux sends: its fields without a tuple
        lba, nblocks = _RW10.unpack_from(cdb)
        len_byte = 7
    else:
        lba, nblocks, len_byte = rw_fields(cdb)
    block_size = lu.block_size
    if lba + nblocks > lu.num_blocks or \
            nblocks > bl.max_transfer_blocks(cmd.req.target_port, block_size):
        check_range(cmd, lba, nblocks, len_byte)  # raises the error that applies
    if nblocks == 0:
        return True
    if not lu.write_gate.shared_free():
        return False  # an exclusive writer (COMPARE AND WRITE, WRITE ATOMIC) holds the LU
    nbytes = nblocks * block_size
    return lu.backing.read_inline(lba * block_size, cmd.in_views(nbytes), nbytes)


def write_fast(cmd: Command) -> bool:
    """A WRITE the backing can take inline (see backing.py), unless COMPARE AND WRITE
    holds the LU's write gate."""
    lu = cmd.lu
    assert lu is not None
    check_writable(lu)
    lba, nblocks, len_byte = rw_fields(cmd.cdb)
    check_range(cmd, lba, nblocks, len_byte)
    if nblocks == 0:
        return True
    if not lu.write_gate.shared_free():
        return False
    sync = fua(cmd.cdb) or not lu.mode.wce
    views = cmd.out_views(nblocks * lu.block_size)
    return lu.backing.write_inline(lba * lu.block_size, views, sync)


async def read(cmd: Command) -> None:
    await do_read(cmd, *rw_fields(cmd.cdb))


async def write(cmd: Command) -> None:
    await do_write(cmd, *rw_fields(cmd.cdb), fua=fua(cmd.cdb))


for _op, _name, _usage in (
    (0x08, "READ(6)", "08 1f ff ff ff 00"),
    (0x28, "READ(10)", "28 18 ff ff ff ff 1f ff ff 00"),
    (0xA8, "READ(12)", "a8 18 ff ff ff ff ff ff ff ff 1f 00"),
    (0x88, "READ(16)", "88 18 ff ff ff ff ff ff ff ff ff ff ff ff 1f 00"),
):
    ROWS.command(_op, None, _name, _usage, medium=True, fast=read_fast)(read)
for _op, _name, _usage in (
    (0x0A, "WRITE(6)", "0a 1f ff ff ff 00"),
    (0x2A, "WRITE(10)", "2a 18 ff ff ff ff 1f ff ff 00"),
    (0xAA, "WRITE(12)", "aa 18 ff ff ff ff ff ff ff ff 1f 00"),
    (0x8A, "WRITE(16)", "8a 18 ff ff ff ff ff ff ff ff ff ff ff ff 1f 00"),
):
    ROWS.command(_op, None, _name, _usage, medium=True, fast=write_fast)(write)


# -- SYNCHRONIZE CACHE -------------------------------------------------------------------


async def synchronize_cache(cmd: Command, lba: int, nblocks: int) -> None:
    """SBC-3 5.22: fdatasync (the whole file: a range sync would not cover metadata).

    IMMED=1 is accepted and still completes only after the flush.
    """
    lu = cmd.lu
    assert lu is not None
    if lba > lu.num_blocks or lba + nblocks > lu.num_blocks:
        raise lba_out_of_range()
    try:
        await lu.backing.flush()
    except OSError as e:
        raise medium_error("write", e) from None


@ROWS.command(0x35, None, "SYNCHRONIZE CACHE(10)", "35 02 ff ff ff ff 1f ff ff 00", medium=True)
async def synchronize_cache_10(cmd: Command) -> None:
    await synchronize_cache(cmd, u32(cmd.cdb, 2), u16(cmd.cdb, 7))


@ROWS.command(0x91, None, "SYNCHRONIZE CACHE(16)",
         "91 02 ff ff ff ff ff ff ff ff ff ff ff ff 1f 00", medium=True)
async def synchronize_cache_16(cmd: Command) -> None:
    await synchronize_cache(cmd, u64(cmd.cdb, 2), u32(cmd.cdb, 10))
