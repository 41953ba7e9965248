"""SBC-3 verification commands: VERIFY, WRITE AND VERIFY, COMPARE AND WRITE."""

from __future__ import annotations

from collections.abc import Sequence

from . import block_limits as bl
from .buffers import prefix, skip
from .cdb import u16, u32, u64
from .command import Command, CommandRows
from .logical_unit import LogicalUnit
from .sbc import check_range, check_writable, do_write, medium_error
from .sense import SenseError, SenseKey, invalid_field_in_cdb, lba_out_of_range

ROWS = CommandRows()


def first_mismatch(medium: bytes | bytearray, views: Sequence[memoryview]) -> int | None:
    """Offset of the first byte where ``views`` differ from ``medium``, or None."""
    pos = 0
    for v in views:
        n = len(v)
        if medium[pos : pos + n] != v:
            seg = medium[pos : pos + n]
            for i in range(n):
                if seg[i] != v[i]:
                    return pos + i
        pos += n
    return None


def miscompare(offset: int) -> SenseError:
    """SBC-3 5.2/5.30: MISCOMPARE DURING VERIFY OPERATION, INFORMATION = byte offset."""
    return SenseError(SenseKey.MISCOMPARE, 0x1D, 0x00, information=offset)


async def read_medium(lu: LogicalUnit, lba: int, nblocks: int) -> bytearray:
    buf = bytearray(nblocks * lu.block_size)
    try:
        await lu.backing.read_into(lba * lu.block_size, [memoryview(buf)])
    except OSError as e:
        raise medium_error("read", e) from None
    return buf


VERIFY_CHUNK_BYTES = 1 << 20  # BYTCHK=0 reads the medium in pieces this big


async def verify_medium(lu: LogicalUnit, lba: int, nblocks: int) -> None:
    """SBC-3 5.29 BYTCHK=0: verify the blocks can be read (a read error is MEDIUM ERROR,
    UNRECOVERED READ ERROR). A file has no ECC of its own to check; reading every block
    back is what "verify the medium" can mean for it. In pieces, abortable between them."""
    per = max(1, VERIFY_CHUNK_BYTES // lu.block_size)
    buf = bytearray(min(nblocks, per) * lu.block_size)
    done = 0
    while done < nblocks:
        n = min(per, nblocks - done)
        try:
            await lu.backing.read_into((lba + done) * lu.block_size,
                                       [memoryview(buf)[: n * lu.block_size]])
        except OSError as e:
            raise medium_error("read", e) from None
        done += n


async def verify(cmd: Command, lba: int, nblocks: int, len_byte: int) -> None:
    """SBC-3 5.29/5.30: BYTCHK 00b reads the range back from the medium (no data
    transfer, so no transfer-length limit); 01b compares the data-out buffer with the
    medium; 10b/11b rejected."""
    lu = cmd.lu
    assert lu is not None
    bytchk = (cmd.cdb[1] >> 1) & 0x3
    if bytchk in (2, 3):
        raise invalid_field_in_cdb(1, 2)
    if bytchk == 0:
        if lba + nblocks > lu.num_blocks:
            raise lba_out_of_range()
        await verify_medium(lu, lba, nblocks)
        return
    check_range(cmd, lba, nblocks, len_byte)
    if nblocks == 0:
        return
    views = cmd.out_views(nblocks * lu.block_size)
    medium = await read_medium(lu, lba, nblocks)
    bad = first_mismatch(medium, views)
    if bad is not None:
        raise miscompare(bad)


@ROWS.command(0x2F, None, "VERIFY(10)", "2f 16 ff ff ff ff 1f ff ff 00", medium=True)
async def verify_10(cmd: Command) -> None:
    await verify(cmd, u32(cmd.cdb, 2), u16(cmd.cdb, 7), 7)


@ROWS.command(0xAF, None, "VERIFY(12)", "af 16 ff ff ff ff ff ff ff ff 1f 00", medium=True)
async def verify_12(cmd: Command) -> None:
    await verify(cmd, u32(cmd.cdb, 2), u32(cmd.cdb, 6), 6)


@ROWS.command(0x8F, None, "VERIFY(16)", "8f 16 ff ff ff ff ff ff ff ff ff ff ff ff 1f 00", medium=True)
async def verify_16(cmd: Command) -> None:
    await verify(cmd, u64(cmd.cdb, 2), u32(cmd.cdb, 10), 10)


async def write_and_verify(cmd: Command, lba: int, nblocks: int, len_byte: int) -> None:
    """SBC-3 5.31: write (reaching the medium: fdatasync), then with BYTCHK=1 read back
    and compare."""
    await do_write(cmd, lba, nblocks, len_byte, fua=True)
    if nblocks and cmd.cdb[1] & 0x02:
        lu = cmd.lu
        assert lu is not None
        medium = await read_medium(lu, lba, nblocks)
        bad = first_mismatch(medium, cmd.out_views(nblocks * lu.block_size))
        if bad is not None:
            raise miscompare(bad)


@ROWS.command(0x2E, None, "WRITE AND VERIFY(10)", "2e 12 ff ff ff ff 1f ff ff 00", medium=True)
async def write_and_verify_10(cmd: Command) -> None:
    await write_and_verify(cmd, u32(cmd.cdb, 2), u16(cmd.cdb, 7), 7)


@ROWS.command(0xAE, None, "WRITE AND VERIFY(12)", "ae 12 ff ff ff ff ff ff ff ff 1f 00", medium=True)
async def write_and_verify_12(cmd: Command) -> None:
    await write_and_verify(cmd, u32(cmd.cdb, 2), u32(cmd.cdb, 6), 6)


@ROWS.command(0x8E, None, "WRITE AND VERIFY(16)", "8e 12 ff ff ff ff ff ff ff ff ff ff ff ff 1f 00",
         medium=True)
async def write_and_verify_16(cmd: Command) -> None:
    await write_and_verify(cmd, u64(cmd.cdb, 2), u32(cmd.cdb, 10), 10)


@ROWS.command(0x89, None, "COMPARE AND WRITE", "89 18 ff ff ff ff ff ff ff ff 00 00 00 ff 1f 00",
         medium=True)
async def compare_and_write(cmd: Command) -> None:
    """SBC-3 5.2: data-out = verify data then write data, NUMBER OF LOGICAL BLOCKS each.

    The read-compare-write runs with the LU's write gate held exclusively, so no
    other write interleaves with it.
    """
    lu = cmd.lu
    assert lu is not None
    c = cmd.cdb
    lba, nblocks = u64(c, 2), c[13]
    check_writable(lu)
    if nblocks > bl.MAX_COMPARE_AND_WRITE_BLOCKS:
        raise invalid_field_in_cdb(13)
    if lba + nblocks > lu.num_blocks:
        raise lba_out_of_range()
    if nblocks == 0:
        return
    n = nblocks * lu.block_size
    views = cmd.out_views(2 * n)
    verify_views, write_views = prefix(views, n), skip(views, n)
    async with lu.write_gate.exclusive():
        medium = await read_medium(lu, lba, nblocks)
        bad = first_mismatch(medium, verify_views)
        if bad is not None:
            raise miscompare(bad)
        try:
            await lu.backing.write_from(lba * lu.block_size, write_views,
                                        sync=bool(c[1] & 0x08) or not lu.mode.wce)
        except OSError as e:
            raise medium_error("write", e) from None
