"""SANITIZE (SBC-3 5.21, 4.11): OVERWRITE, BLOCK ERASE, EXIT FAILURE MODE, progress."""

from __future__ import annotations

import errno
import struct

import trio

from bridge.scsi import sbc_sanitize

from .helpers import MiB, assert_check, assert_good, make_target, read10, run, write10

BS = 512
NUM_BLOCKS = 4 * MiB // BS


def sanitize(sa, plen=0, immed=False, ause=False):
    return struct.pack(">BB5sHB", 0x48, sa | (0x80 if immed else 0) | (0x20 if ause else 0),
                       bytes(5), plen, 0)


def overwrite_params(pattern, count=1, invert=False):
    return bytes(((0x80 if invert else 0) | count, 0)) + struct.pack(">H", len(pattern)) + pattern


async def fill(t):
    assert_good(await run(t, write10(0, 8), data_out=b"a" * 8 * BS))
    assert_good(await run(t, write10(NUM_BLOCKS - 8, 8), data_out=b"a" * 8 * BS))


async def test_overwrite(target):
    await fill(target)
    p = overwrite_params(b"\xaa" * BS)
    assert_good(await run(target, sanitize(1, len(p)), data_out=p))
    for lba in (0, NUM_BLOCKS - 8):
        assert (await run(target, read10(lba, 8), data_in=8 * BS)).data == b"\xaa" * 8 * BS
    # a 4-byte pattern repeats over each block; INVERT with 2 passes ends inverted
    p = overwrite_params(b"\x01\x02\x03\x04", count=2, invert=True)
    assert_good(await run(target, sanitize(1, len(p)), data_out=p))
    assert (await run(target, read10(5, 1), data_in=BS)).data == b"\xfe\xfd\xfc\xfb" * (BS // 4)


async def test_overwrite_errors(target):
    for plen in range(5):
        assert_check(await run(target, sanitize(1, plen), data_out=bytes(plen)), 0x05, 0x24)
    assert_check(await run(target, sanitize(1, BS + 5), data_out=bytes(BS + 5)), 0x05, 0x24)
    bad = [overwrite_params(b"\xaa" * BS, count=0),  # OVERWRITE COUNT 0
           bytes((1, 0, 0, 0)) + bytes(BS),  # pattern length 0
           bytes((1, 0)) + struct.pack(">H", BS + 4) + bytes(BS)]  # longer than the list
    for p in bad:
        assert_check(await run(target, sanitize(1, len(p)), data_out=p), 0x05, 0x26)


async def test_block_erase_deallocates_everything(target):
    await fill(target)
    assert_good(await run(target, sanitize(2)))
    assert (await run(target, read10(0, 8), data_in=8 * BS)).data == bytes(8 * BS)
    r = await run(target, struct.pack(">BBQIBB", 0x9E, 0x12, 0, 1024, 0, 0), data_in=1024)
    lba, n, status = struct.unpack_from(">QIB", r.data, 8)
    assert (lba, n, status) == (0, NUM_BLOCKS, 1)  # one deallocated extent, the whole LU
    assert_check(await run(target, sanitize(2, 8), data_out=bytes(8)), 0x05, 0x24)
    # Block Device Characteristics: WABEREQ 01b, WACEREQ 00b
    r = await run(target, bytes((0x12, 1, 0xB1, 0, 0xFF, 0)), data_in=255)
    assert r.data[7] & 0xF0 == 0x40


async def test_service_actions(target):
    for sa in range(0x20):
        r = await run(target, sanitize(sa))
        if sa in (1, 2, 0x1F):
            continue
        assert_check(r, 0x05, 0x24)  # CRYPTOGRAPHIC ERASE (03h) included: not offered
    # RSOC lists the three service actions of 48h
    r = await run(target, bytes((0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0)), data_in=4096)
    n = struct.unpack_from(">I", r.data)[0]
    descs = [r.data[4 + i : 12 + i] for i in range(0, n, 8)]
    sas = sorted(struct.unpack_from(">H", d, 2)[0] for d in descs if d[0] == 0x48)
    assert sas == [1, 2, 0x1F]


async def test_exit_failure_mode(target, monkeypatch):
    assert_check(await run(target, sanitize(0x1F, 8), data_out=bytes(8)), 0x05, 0x24)
    assert_check(await run(target, sanitize(0x1F)), 0x05, 0x2C)  # not in failure mode
    lu = target.logical_unit("disk0")

    async def broken(offset, length):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(lu.backing, "punch_hole", broken)
    assert_check(await run(target, sanitize(2, ause=True)), 0x03, 0x31, 0x03)
    # failure mode: medium access fails, REQUEST SENSE says so
    assert_check(await run(target, read10(0, 1), data_in=BS), 0x03, 0x31, 0x03)
    r = await run(target, bytes((0x03, 0, 0, 0, 252, 0)), data_in=252, clear_ua=False)
    assert (r.data[2] & 0xF, r.data[12], r.data[13]) == (0x03, 0x31, 0x03)
    assert_good(await run(target, sanitize(0x1F)))
    assert_good(await run(target, read10(0, 1), data_in=BS))
    # without AUSE, only a successful sanitize leaves failure mode
    assert_check(await run(target, sanitize(2)), 0x03, 0x31, 0x03)
    assert_check(await run(target, sanitize(0x1F)), 0x05, 0x24)
    monkeypatch.undo()
    assert_good(await run(target, sanitize(2)))
    assert_good(await run(target, read10(0, 1), data_in=BS))


async def test_immediate_with_progress(target, monkeypatch):
    monkeypatch.setattr(sbc_sanitize, "OVERWRITE_PIECE_BYTES", 64 * 1024)
    lu = target.logical_unit("disk0")
    gate = trio.Event()
    real = lu.backing.write_from
    pieces = 0

    async def slow(offset, views, sync):
        nonlocal pieces
        pieces += 1
        if pieces == 3:
            await gate.wait()
        await real(offset, views, sync)

    monkeypatch.setattr(lu.backing, "write_from", slow)
    p = overwrite_params(b"\x55" * BS)
    assert_good(await run(target, sanitize(1, len(p), immed=True), data_out=p))
    await trio.sleep(0.05)
    # NOT READY, SANITIZE IN PROGRESS with a progress indication, to TUR and REQUEST SENSE
    r = await run(target, bytes(6), clear_ua=False)
    assert_check(r, 0x02, 0x04, 0x1B)
    sks = r.resp.sense[15:18]
    assert sks[0] & 0x80 and 0 < struct.unpack(">H", sks[1:])[0] < 0x10000
    r = await run(target, bytes((0x03, 0, 0, 0, 252, 0)), data_in=252, clear_ua=False)
    assert (r.data[2] & 0xF, r.data[12], r.data[13]) == (0x02, 0x04, 0x1B)
    assert_check(await run(target, read10(0, 1), data_in=BS, clear_ua=False), 0x02, 0x04, 0x1B)
    r = await run(target, sanitize(2), clear_ua=False)  # another sanitize meanwhile
    assert_check(r, 0x02, 0x04, 0x1B)
    gate.set()
    with trio.fail_after(10):
        while lu.sanitize.running:
            await trio.sleep(0.01)
    assert (await run(target, read10(7, 1), data_in=BS)).data == b"\x55" * BS


async def test_read_only(tmp_path):
    t = make_target(tmp_path, read_only=True)
    try:
        assert_check(await run(t, sanitize(2)), 0x07, 0x27)
    finally:
        t.close()
