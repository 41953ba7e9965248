"""PRE-FETCH, READ DEFECT DATA, ORWRITE, WRITE ATOMIC, VERIFY with BYTCHK=0 (issue 13)."""

from __future__ import annotations

import errno
import struct

import pytest
import trio

from bridge.scsi.request import ScsiStatus, TargetPort

from .helpers import MiB, assert_check, assert_good, make_target, read10, run, write10

BS = 512


def prefetch10(lba, n, immed=0, group=0):
    return struct.pack(">BBIBHB", 0x34, immed << 1, lba, group, n, 0)


def prefetch16(lba, n, immed=0, group=0):
    return struct.pack(">BBQIBB", 0x90, immed << 1, lba, n, group, 0)


def orwrite16(lba, n, flags=0):
    return struct.pack(">BBQIBB", 0x8B, flags, lba, n, 0, 0)


def write_atomic16(lba, n, flags=0, boundary=0):
    return struct.pack(">BBQHHBB", 0x9C, flags, lba, boundary, n, 0, 0)


def verify16(lba, n, bytchk=0):
    return struct.pack(">BBQIBB", 0x8F, bytchk << 1, lba, n, 0, 0)


NUM_BLOCKS = 4 * MiB // BS


# -- PRE-FETCH --------------------------------------------------------------------------


@pytest.mark.parametrize("cdb", [prefetch10, prefetch16])
async def test_prefetch_good_within_range(target, cdb):
    for lba, n in ((0, 1), (0, 256), (NUM_BLOCKS - 256, 256), (NUM_BLOCKS - 1, 0), (5, 0)):
        r = await run(target, cdb(lba, n))
        assert_good(r)  # GOOD, not CONDITION MET: the advice does not prove the cache holds them
    assert_good(await run(target, cdb(0, 1, immed=1, group=3)))


@pytest.mark.parametrize("cdb", [prefetch10, prefetch16])
async def test_prefetch_beyond_end(target, cdb):
    assert_check(await run(target, cdb(NUM_BLOCKS, 1)), 0x05, 0x21)
    assert_check(await run(target, cdb(NUM_BLOCKS - 1, 2)), 0x05, 0x21)
    assert_check(await run(target, cdb(NUM_BLOCKS + 1, 0)), 0x05, 0x21)
    assert_good(await run(target, cdb(NUM_BLOCKS, 0)))  # zero blocks at the end: nothing


async def test_prefetch_asks_the_page_cache(target, monkeypatch):
    import os
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, adv: calls.append((off, n, adv)))
    assert_good(await run(target, prefetch10(8, 16)))
    assert calls == [(8 * BS, 16 * BS, os.POSIX_FADV_WILLNEED)]


# -- READ DEFECT DATA -------------------------------------------------------------------


async def test_read_defect_data_10_empty_lists(target):
    cdb = struct.pack(">BBBBBBBHB", 0x37, 0, 0x18 | 0x03, 0, 0, 0, 0, 32, 0)
    r = await run(target, cdb, data_in=32)
    assert_good(r)
    assert r.data == bytes((0, 0x1B, 0, 0))  # PLISTV, GLISTV, long block format, length 0
    cdb = struct.pack(">BBBBBBBHB", 0x37, 0, 0x00, 0, 0, 0, 0, 32, 0)
    assert (await run(target, cdb, data_in=32)).data == bytes(4)
    cdb = struct.pack(">BBBBBBBHB", 0x37, 0, 0x07, 0, 0, 0, 0, 32, 0)  # reserved format
    r = await run(target, cdb, data_in=32)
    assert_check(r, 0x05, 0x24)
    assert r.field_pointer == (True, 2, 2)


async def test_read_defect_data_12_empty_lists(target):
    cdb = struct.pack(">BBIIBB", 0xB7, 0x10 | 0x05, 0, 32, 0, 0)
    r = await run(target, cdb, data_in=32)
    assert_good(r)
    assert r.data == bytes((0, 0x15)) + bytes(6)
    r = await run(target, struct.pack(">BBIIBB", 0xB7, 0, 0, 4, 0, 0), data_in=32)
    assert r.data == bytes(4)  # allocation length respected


# -- ORWRITE ----------------------------------------------------------------------------


async def test_orwrite_ors_into_the_medium(target):
    assert_good(await run(target, write10(0, 2), data_out=b"\x0f" * BS + b"\x00" * BS))
    r = await run(target, orwrite16(0, 2), data_out=b"\xa0" * BS + b"\x5a" * BS)
    assert_good(r)
    r = await run(target, read10(0, 2), data_in=2 * BS)
    assert r.data == b"\xaf" * BS + b"\x5a" * BS
    assert_good(await run(target, orwrite16(0, 0)))
    assert_check(await run(target, orwrite16(NUM_BLOCKS - 1, 2), data_out=bytes(2 * BS)), 0x05, 0x21)
    r = await run(target, orwrite16(0, 1, flags=0x20), data_out=bytes(BS))  # ORPROTECT
    assert_check(r, 0x05, 0x24)
    assert_good(await run(target, orwrite16(0, 1, flags=0x18), data_out=bytes(BS)))  # DPO FUA


async def test_orwrite_and_write_atomic_read_only(tmp_path):
    t = make_target(tmp_path, read_only=True)
    try:
        assert_check(await run(t, orwrite16(0, 1), data_out=bytes(BS)), 0x07, 0x27)
        assert_check(await run(t, write_atomic16(0, 1), data_out=bytes(BS)), 0x07, 0x27)
    finally:
        t.close()


async def test_orwrite_excludes_reads_until_written(target, monkeypatch):
    """A READ arriving while ORWRITE holds the LU waits for the whole result."""
    lu = target.logical_unit("disk0")
    started, release = trio.Event(), trio.Event()
    real = lu.backing.write_from

    async def slow_write(offset, views, sync):
        started.set()
        await release.wait()
        await real(offset, views, sync)

    monkeypatch.setattr(lu.backing, "write_from", slow_write)
    results = {}
    async with trio.open_nursery() as n:
        async def ow():
            results["ow"] = await run(target, orwrite16(0, 1), data_out=b"\x11" * BS, tag=1)
        async def rd():
            results["rd"] = await run(target, read10(0, 1), data_in=BS, tag=2, clear_ua=False)
        n.start_soon(ow)
        await started.wait()
        n.start_soon(rd)
        await trio.sleep(0.01)
        assert "rd" not in results
        release.set()
    assert_good(results["ow"])
    assert results["rd"].data == b"\x11" * BS


# -- WRITE ATOMIC -----------------------------------------------------------------------


async def test_write_atomic(target):
    data = bytes(range(256)) * 4
    assert_good(await run(target, write_atomic16(4, 2), data_out=data))
    assert (await run(target, read10(4, 2), data_in=2 * BS)).data == data
    assert_good(await run(target, write_atomic16(0, 0)))
    assert_check(await run(target, write_atomic16(NUM_BLOCKS - 1, 2), data_out=bytes(2 * BS)),
                 0x05, 0x21)
    r = await run(target, write_atomic16(0, 1, boundary=1), data_out=bytes(BS))
    assert_check(r, 0x05, 0x24)  # no atomic boundary support
    assert r.field_pointer == (True, 11, 0)  # the ATOMIC BOUNDARY bit set
    port = TargetPort("p", max_transfer_bytes=8 * BS)
    r = await run(target, write_atomic16(0, 9), data_out=bytes(9 * BS), target_port=port)
    assert_check(r, 0x05, 0x24)
    assert r.field_pointer == (True, 12, None)


async def test_block_limits_atomic_fields(target):
    port = TargetPort("p", max_transfer_bytes=1 * MiB)
    r = await run(target, bytes((0x12, 1, 0xB0, 0, 0xFF, 0)), data_in=255, target_port=port)
    max_len, = struct.unpack_from(">I", r.data, 8)
    max_atomic, align, gran, with_boundary, boundary = struct.unpack_from(">IIIII", r.data, 44)
    assert max_atomic == max_len == MiB // BS
    assert (align, gran, with_boundary, boundary) == (0, 0, 0, 0)


# -- VERIFY, BYTCHK=0 -------------------------------------------------------------------


async def test_verify_bytchk0_reads_the_medium(target, monkeypatch):
    lu = target.logical_unit("disk0")
    read = []
    real = lu.backing.read_into

    async def spy(offset, views):
        read.append((offset, sum(map(len, views))))
        await real(offset, views)

    monkeypatch.setattr(lu.backing, "read_into", spy)
    assert_good(await run(target, verify16(0, NUM_BLOCKS)))
    assert sum(n for _o, n in read) == NUM_BLOCKS * BS
    assert max(n for _o, n in read) <= MiB  # in pieces

    async def failing(offset, views):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(lu.backing, "read_into", failing)
    r = await run(target, verify16(0, 8))
    assert r.status == ScsiStatus.CHECK_CONDITION
    assert_check(r, 0x03, 0x11)  # MEDIUM ERROR, UNRECOVERED READ ERROR
    assert_check(await run(target, verify16(NUM_BLOCKS - 1, 2)), 0x05, 0x21)
