"""SBC-3/SPC-4 commands beyond the first slice: success and error paths."""

from __future__ import annotations

import os
import struct

from bridge.scsi.request import (
    ScsiStatus,
    ServiceResponse,
)
from bridge.scsi.sense import SenseKey

from .helpers import (
    INI_A,
    INI_B,
    MiB,
    assert_check,
    assert_good,
    make_target,
    read10,
    run,
    write10,
)

BS = 512


def verify10(lba, n, bytchk=0):
    return struct.pack(">BBIBHB", 0x2F, bytchk << 1, lba, 0, n, 0)


def sync10(lba=0, n=0):
    return struct.pack(">BBIBHB", 0x35, 0, lba, 0, n, 0)


def caw(lba, n, flags=0):
    return struct.pack(">BBQ3sBBB", 0x89, flags, lba, b"\0\0\0", n, 0, 0)


def ws16(lba, n, flags=0):
    return struct.pack(">BBQIBB", 0x93, flags, lba, n, 0, 0)


def ws10(lba, n, flags=0):
    return struct.pack(">BBIBHB", 0x41, flags, lba, 0, n, 0)


def unmap_cdb(plen):
    return struct.pack(">BB4sBHB", 0x42, 0, b"\0" * 4, 0, plen, 0)


def unmap_params(ranges):
    descs = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", 6 + len(descs), len(descs)) + descs


def get_lba_status(lba, alloc=1024):
    return struct.pack(">BBQIBB", 0x9E, 0x12, lba, alloc, 0, 0)


def lba_status_descs(data):
    n = struct.unpack(">I", data[:4])[0]
    body = data[8 : 4 + n]
    return [struct.unpack(">QIB3x", body[i : i + 16]) for i in range(0, len(body), 16)]


async def write_blocks(t, lba, data, **kw):
    r = await run(t, write10(lba, len(data) // BS), data_out=data, **kw)
    assert_good(r)


async def read_blocks(t, lba, n, **kw):
    r = await run(t, read10(lba, n), data_in=n * BS, **kw)
    assert_good(r)
    return r.data


# -- SYNCHRONIZE CACHE ------------------------------------------------------------------


async def test_synchronize_cache(target):
    assert_good(await run(target, sync10()))
    assert_good(await run(target, struct.pack(">BBQIBB", 0x91, 0x02, 0, 8, 0, 0)))
    r = await run(target, sync10(4 * MiB // BS, 1))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x21)


# -- VERIFY / WRITE AND VERIFY / COMPARE AND WRITE ---------------------------------------


async def test_verify(target):
    data = os.urandom(2 * BS)
    await write_blocks(target, 5, data)
    assert_good(await run(target, verify10(5, 2)))
    assert_good(await run(target, verify10(5, 2, bytchk=1), data_out=data))
    bad = bytearray(data)
    bad[700] ^= 1
    r = await run(target, verify10(5, 2, bytchk=1), data_out=bytes(bad))
    assert_check(r, SenseKey.MISCOMPARE, 0x1D)
    assert r.resp.sense[0] & 0x80 and struct.unpack(">I", r.resp.sense[3:7])[0] == 700
    r = await run(target, verify10(5, 2, bytchk=2), data_out=data)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)
    assert r.field_pointer == (True, 1, 2)
    r = await run(target, verify10(4 * MiB // BS, 1))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x21)
    r = await run(target, verify10(5, 2, bytchk=1), data_out=data[:100])
    assert r.resp.response == ServiceResponse.DATA_OVERRUN


async def test_write_and_verify(target):
    data = os.urandom(3 * BS)
    r = await run(target, struct.pack(">BBIBHB", 0x2E, 0x02, 20, 0, 3, 0), data_out=data)
    assert_good(r)
    assert await read_blocks(target, 20, 3) == data
    r = await run(target, struct.pack(">BBQIBB", 0x8E, 0, 30, 1, 0, 0), data_out=data[:BS])
    assert_good(r)
    assert await read_blocks(target, 30, 1) == data[:BS]
    r = await run(target, struct.pack(">BBIIBB", 0xAE, 0x02, 31, 2, 0, 0), data_out=data[:2 * BS])
    assert_good(r)
    assert await read_blocks(target, 31, 2) == data[: 2 * BS]
    r = await run(target, struct.pack(">BBIIBB", 0xAF, 0x02, 31, 2, 0, 0), data_out=data[:2 * BS])
    assert_good(r)  # VERIFY(12) BYTCHK=1 against what was just written
    r = await run(target, struct.pack(">BBIIBB", 0xAF, 0x02, 31, 2, 0, 0), data_out=bytes(2 * BS))
    assert_check(r, SenseKey.MISCOMPARE, 0x1D)


async def test_compare_and_write(target):
    old = os.urandom(2 * BS)
    new = os.urandom(2 * BS)
    await write_blocks(target, 40, old)
    assert_good(await run(target, caw(40, 2), data_out=old + new))
    assert await read_blocks(target, 40, 2) == new
    # now the medium holds `new`: comparing against `old` fails at byte offset of 1st diff
    first = next(i for i in range(len(old)) if old[i] != new[i])
    r = await run(target, caw(40, 2), data_out=old + os.urandom(2 * BS))
    assert_check(r, SenseKey.MISCOMPARE, 0x1D)
    assert struct.unpack(">I", r.resp.sense[3:7])[0] == first
    assert await read_blocks(target, 40, 2) == new  # unchanged
    r = await run(target, caw(40, 33), data_out=bytes(66 * BS))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)
    assert r.field_pointer == (True, 13, None)
    r = await run(target, caw(4 * MiB // BS - 1, 2), data_out=bytes(4 * BS))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x21)
    r = await run(target, caw(40, 2), data_out=bytes(3 * BS))
    assert r.resp.response == ServiceResponse.DATA_OVERRUN


async def test_compare_and_write_read_only(tmp_path):
    t = make_target(tmp_path, read_only=True)
    try:
        r = await run(t, caw(0, 1), data_out=bytes(2 * BS))
        assert_check(r, SenseKey.DATA_PROTECT, 0x27)
    finally:
        t.close()


# -- WRITE SAME / UNMAP / GET LBA STATUS -------------------------------------------------


async def test_get_lba_status_sparse_then_written(target):
    r = await run(target, get_lba_status(0), data_in=1024)
    assert_good(r)
    assert lba_status_descs(r.data) == [(0, 4 * MiB // BS, 1)]
    await write_blocks(target, 0, os.urandom(8 * BS))  # one 4 KiB page
    r = await run(target, get_lba_status(0), data_in=1024)
    descs = lba_status_descs(r.data)
    assert descs[0] == (0, 8, 0)
    assert descs[1] == (8, 4 * MiB // BS - 8, 1)
    r = await run(target, get_lba_status(4 * MiB // BS), data_in=1024)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x21)


async def test_unmap_punches_holes(target, tmp_path):
    await write_blocks(target, 0, os.urandom(64 * BS))
    st = os.stat(tmp_path / "disk0.img")
    assert st.st_blocks >= 64
    params = unmap_params([(0, 32), (48, 16)])
    r = await run(target, unmap_cdb(len(params)), data_out=params)
    assert_good(r)
    assert await read_blocks(target, 0, 32) == bytes(32 * BS)
    assert await read_blocks(target, 48, 16) == bytes(16 * BS)
    assert await read_blocks(target, 32, 16) != bytes(16 * BS)
    assert os.stat(tmp_path / "disk0.img").st_blocks < st.st_blocks
    r = await run(target, get_lba_status(0), data_in=1024)
    assert lba_status_descs(r.data)[:3] == [(0, 32, 1), (32, 16, 0), (48, 4 * MiB // BS - 48, 1)]


async def test_unmap_errors(target):
    assert_good(await run(target, unmap_cdb(0)))
    r = await run(target, unmap_cdb(6), data_out=bytes(6))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x1A)
    params = unmap_params([(4 * MiB // BS - 1, 2)])
    r = await run(target, unmap_cdb(len(params)), data_out=params)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x21)
    params = unmap_params([(i, 1) for i in range(257)])
    r = await run(target, unmap_cdb(len(params)), data_out=params)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x26)
    params = unmap_params([(0, 4 * MiB // BS)] * 200)  # 1.6M blocks > MAXIMUM UNMAP LBA COUNT
    r = await run(target, unmap_cdb(len(params)), data_out=params)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x26)
    r = await run(target, unmap_cdb(24), data_out=bytes(10))
    assert r.resp.response == ServiceResponse.DATA_OVERRUN


async def test_write_same(target):
    block = os.urandom(BS)
    assert_good(await run(target, ws10(100, 10), data_out=block))
    assert await read_blocks(target, 100, 10) == block * 10
    # UNMAP=1 with a zero block deallocates
    await write_blocks(target, 200, os.urandom(16 * BS))
    assert_good(await run(target, ws16(200, 16, flags=0x08), data_out=bytes(BS)))
    assert await read_blocks(target, 200, 16) == bytes(16 * BS)
    r = await run(target, get_lba_status(200), data_in=64)
    assert lba_status_descs(r.data)[0][2] == 1
    # NDOB: no data-out buffer at all
    await write_blocks(target, 300, os.urandom(8 * BS))
    assert_good(await run(target, ws16(300, 8, flags=0x09)))
    assert await read_blocks(target, 300, 8) == bytes(8 * BS)
    # UNMAP=1 deallocates whatever the block holds (LIO/libiscsi semantics, LBPRZ=1)
    await write_blocks(target, 400, os.urandom(2 * BS))
    assert_good(await run(target, ws16(400, 2, flags=0x08), data_out=block))
    assert await read_blocks(target, 400, 2) == bytes(2 * BS)


async def test_write_same_errors(target):
    r = await run(target, ws10(4 * MiB // BS - 1, 2), data_out=bytes(BS))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x21)
    r = await run(target, ws10(0, 1, flags=0x10), data_out=bytes(BS))  # ANCHOR
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)
    assert r.field_pointer == (True, 1, 4)
    # a data-out buffer that is not one block: refused (SBC-3 5.42), either way
    for size in (100, BS // 2, 2 * BS):
        r = await run(target, ws10(0, 1), data_out=bytes(size))
        assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)
        r = await run(target, ws16(0, 1, flags=0x08), data_out=bytes(size))  # UNMAP
        assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)
    r = await run(target, ws10(0, 1))  # no data-out buffer at all: the transport's OVERRUN
    assert r.resp.response == ServiceResponse.DATA_OVERRUN


async def test_write_same_too_long(tmp_path):
    t = make_target(tmp_path, size=64 * MiB)
    try:
        assert_good(await run(t, ws16(0, 0xFFFF, flags=0x08), data_out=bytes(BS)))
        r = await run(t, ws16(0, 0x10000), data_out=bytes(BS))
        assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)
        assert r.field_pointer == (True, 10, None)
    finally:
        t.close()


# -- MODE SENSE / MODE SELECT ------------------------------------------------------------


def mode_sense6(page, pc=0, dbd=False, alloc=255, sub=0):
    return bytes((0x1A, 0x08 if dbd else 0, (pc << 6) | page, sub, alloc, 0))


def mode_sense10(page, pc=0, dbd=False, llbaa=False, alloc=1024):
    b1 = (0x08 if dbd else 0) | (0x10 if llbaa else 0)
    return struct.pack(">BBBB3sHB", 0x5A, b1, (pc << 6) | page, 0, b"\0\0\0", alloc, 0)


def pages_of(data, off):
    out = {}
    while off < len(data):
        out[data[off] & 0x3F] = data[off : off + 2 + data[off + 1]]
        off += 2 + data[off + 1]
    return out


async def test_mode_sense_6_caching_page(target):
    r = await run(target, mode_sense6(0x08), data_in=255)
    assert_good(r)
    d = r.data
    assert d[0] == len(d) - 1 and d[3] == 8
    blocks, bs = struct.unpack(">I", d[4:8])[0], int.from_bytes(d[9:12], "big")
    assert (blocks, bs) == (4 * MiB // BS, BS)
    assert d[2] & 0x10 and not d[2] & 0x80  # DPOFUA, not write protected
    page = d[12:]
    assert page[0] == 0x08 and page[1] == 0x12 and page[2] & 0x04  # WCE=1 by default


async def test_mode_sense_all_pages_and_dbd(target):
    r = await run(target, mode_sense6(0x3F, dbd=True), data_in=255)
    assert r.data[3] == 0
    assert sorted(pages_of(r.data, 4)) == [0x08, 0x0A, 0x1C]
    r = await run(target, mode_sense10(0x3F, llbaa=True), data_in=1024)
    d = r.data
    assert struct.unpack(">H", d[0:2])[0] == len(d) - 2 and d[4] & 1
    assert struct.unpack(">H", d[6:8])[0] == 16
    assert struct.unpack(">Q", d[8:16])[0] == 4 * MiB // BS
    assert sorted(pages_of(d, 24)) == [0x08, 0x0A, 0x1C]


async def test_mode_sense_changeable_default_saved(target):
    r = await run(target, mode_sense6(0x08, pc=1, dbd=True), data_in=255)
    assert r.data[4:] == bytes((0x08, 0x12, 0x04)) + bytes(17)
    r = await run(target, mode_sense6(0x0A, pc=2, dbd=True), data_in=255)
    assert r.data[4] == 0x0A and r.data[6] & 0x04 == 0
    r = await run(target, mode_sense6(0x1C, pc=3, dbd=True), data_in=255)
    assert r.data[4] == 0x1C and r.data[6] & 0x08


async def test_mode_sense_errors(target):
    r = await run(target, mode_sense6(0x19), data_in=255)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)
    assert r.field_pointer == (True, 2, 5)
    r = await run(target, mode_sense6(0x08, sub=1), data_in=255)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)
    assert r.field_pointer == (True, 3, None)


async def test_mode_sense_read_only_sets_wp(tmp_path):
    t = make_target(tmp_path, read_only=True)
    try:
        r = await run(t, mode_sense6(0x08), data_in=255)
        assert r.data[2] & 0x80
    finally:
        t.close()


def caching_page(wce):
    return bytes((0x08, 0x12, 0x04 if wce else 0)) + bytes(17)


def mode_select6(params, sp=False):
    return bytes((0x15, 0x10 | (1 if sp else 0), 0, 0, len(params), 0))


async def test_mode_select_wce_and_unit_attention_for_others(target):
    await run(target, bytes(6), initiator=INI_B)  # B's power-on UA consumed
    params = bytes(4) + caching_page(False)
    r = await run(target, mode_select6(params), data_out=params)
    assert_good(r)
    assert not target.logical_unit("disk0").mode.wce
    r = await run(target, mode_sense6(0x08, dbd=True), data_in=255)
    assert not r.data[6] & 0x04
    # the other nexus gets MODE PARAMETERS CHANGED, the issuer does not
    r = await run(target, bytes(6), initiator=INI_B, clear_ua=False)
    assert_check(r, SenseKey.UNIT_ATTENTION, 0x2A, 0x01)
    assert_good(await run(target, bytes(6), clear_ua=False))
    # writes still work with WCE=0 (each followed by fdatasync)
    await write_blocks(target, 0, os.urandom(BS))


async def test_mode_select_rejects_unchangeable_bits(target):
    page = bytearray(caching_page(True))
    page[2] |= 0x01  # RCD is not changeable
    params = bytes(4) + bytes(page)
    r = await run(target, mode_select6(params), data_out=params)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x26)
    assert r.field_pointer == (False, 6, 0)
    params = bytes(4) + bytes((0x08, 0x10)) + bytes(16)  # wrong page length
    r = await run(target, mode_select6(params), data_out=params)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x26)
    assert r.field_pointer == (False, 5, None)
    params = bytes(4) + bytes((0x19, 0x06)) + bytes(6)  # unknown page
    r = await run(target, mode_select6(params), data_out=params)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x26)
    assert r.field_pointer == (False, 4, 5)
    params = bytes((0, 0, 0, 8)) + struct.pack(">IB", 0, 0) + (4096).to_bytes(3, "big")
    r = await run(target, mode_select6(params), data_out=params)  # block length change
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x26)
    r = await run(target, mode_select6(b"\0\0"), data_out=b"\0\0")
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x1A)
    assert target.logical_unit("disk0").mode.wce  # nothing was applied


async def test_mode_select_d_sense_switches_to_descriptor_sense(target):
    ctrl = bytearray((0x0A, 0x0A, 0x04, 0x10, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0))
    params = bytes(4) + bytes(ctrl)
    assert_good(await run(target, mode_select6(params), data_out=params))
    r = await run(target, read10(4 * MiB // BS, 1), data_in=BS)
    assert r.status == ScsiStatus.CHECK_CONDITION
    assert r.resp.sense[0] == 0x72 and r.resp.sense[1:4] == bytes((5, 0x21, 0))
    r = await run(target, read10(0, 1, flags=0x80), data_in=BS)
    assert r.resp.sense[0] == 0x72 and r.field_pointer == (True, 1, 7)


async def test_mode_select_saved_survives_restart(tmp_path):
    t = make_target(tmp_path)
    params = bytes(4) + caching_page(False)
    assert_good(await run(t, mode_select6(params, sp=True), data_out=params))
    t.close()
    t2 = make_target(tmp_path)
    try:
        assert not t2.logical_unit("disk0").mode.wce
        r = await run(t2, mode_sense6(0x08, pc=3, dbd=True), data_in=255)
        assert not r.data[6] & 0x04
    finally:
        t2.close()


async def test_mode_select_10(target):
    params = bytes(8) + caching_page(False)
    cdb = struct.pack(">BB5sHB", 0x55, 0x10, b"\0" * 5, len(params), 0)
    assert_good(await run(target, cdb, data_out=params))
    assert not target.logical_unit("disk0").mode.wce


# -- START STOP UNIT / PREVENT ALLOW MEDIUM REMOVAL --------------------------------------


async def test_start_stop_unit(target):
    assert_good(await run(target, bytes((0x1B, 0, 0, 0, 0x00, 0))))  # stop
    r = await run(target, read10(0, 1), data_in=BS)
    assert_check(r, SenseKey.NOT_READY, 0x04, 0x02)
    r = await run(target, bytes(6))
    assert_check(r, SenseKey.NOT_READY, 0x04, 0x02)
    assert_good(await run(target, bytes((0x12, 0, 0, 0, 36, 0)), data_in=36))  # INQUIRY ok
    assert_good(await run(target, bytes((0x1B, 1, 0, 0, 0x01, 0))))  # start, IMMED
    assert_good(await run(target, read10(0, 1), data_in=BS))
    r = await run(target, bytes((0x1B, 0, 0, 0, 0x02, 0)))  # LOEJ
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)
    assert r.field_pointer == (True, 4, 1)
    r = await run(target, bytes((0x1B, 0, 0, 0, 0x31, 0)))  # power condition 3
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)
    assert r.field_pointer == (True, 4, 7)


async def test_prevent_allow_medium_removal(target):
    assert_good(await run(target, bytes((0x1E, 0, 0, 0, 1, 0))))
    assert INI_A in target.logical_unit("disk0").prevent_removal
    assert_good(await run(target, bytes((0x1E, 0, 0, 0, 0, 0))))
    assert INI_A not in target.logical_unit("disk0").prevent_removal
    r = await run(target, bytes((0x1E, 0, 0, 0, 2, 0)))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)


# -- REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS -------------------------


def rsoc(option, op=0, sa=0, rctd=False, alloc=8192):
    return struct.pack(">BBBBHIBB", 0xA3, 0x0C, (0x80 if rctd else 0) | option, op, sa, alloc,
                       0, 0)


async def test_rsoc_all(target):
    r = await run(target, rsoc(0), data_in=8192)
    assert_good(r)
    n = struct.unpack(">I", r.data[:4])[0]
    descs = [r.data[4 + i : 12 + i] for i in range(0, n, 8)]
    by_key = {(d[0], struct.unpack(">H", d[2:4])[0] if d[5] & 1 else None): d for d in descs}
    assert struct.unpack(">H", by_key[(0x28, None)][6:8])[0] == 10
    assert (0x9E, 0x10) in by_key and (0x9E, 0x12) in by_key and (0x42, None) in by_key
    assert (0x5F, 0x00) in by_key and (0xA3, 0x0C) in by_key
    r = await run(target, rsoc(0, rctd=True), data_in=8192)
    n2 = struct.unpack(">I", r.data[:4])[0]
    assert n2 == n // 8 * 20 and r.data[4 + 5] & 0x02


async def test_rsoc_one_command(target):
    r = await run(target, rsoc(1, op=0x28), data_in=64)
    assert_good(r)
    d = r.data
    assert d[1] & 0x07 == 3 and struct.unpack(">H", d[2:4])[0] == 10
    assert d[4:14] == bytes.fromhex("28 18 ff ff ff ff 1f ff ff 00")
    r = await run(target, rsoc(1, op=0xC0), data_in=64)
    assert r.data[1] & 7 == 1
    r = await run(target, rsoc(1, op=0x9E), data_in=64)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)
    r = await run(target, rsoc(2, op=0x9E, sa=0x10), data_in=64)
    assert r.data[1] & 7 == 3 and r.data[4:6] == b"\x9e\x10"
    r = await run(target, rsoc(2, op=0x9E, sa=0x11), data_in=64)
    assert r.data[1] & 7 == 1
    r = await run(target, rsoc(2, op=0x28), data_in=64)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)
    r = await run(target, rsoc(1, op=0x28, rctd=True), data_in=64)
    assert r.data[1] & 0x80 and len(r.data) == 4 + 10 + 12
    r = await run(target, rsoc(5), data_in=64)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)


async def test_rsoc_knows_service_action_opcodes_the_target_does_not_implement(target):
    # SPC-4 6.35.2: reporting option 001b on an opcode with service actions is an
    # INVALID FIELD IN CDB, implemented or not (EXTENDED COPY, 83h; SERVICE ACTION IN(12), ABh).
    for op in (0x83, 0xAB):
        r = await run(target, rsoc(1, op=op), data_in=64)
        assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)
        r = await run(target, rsoc(2, op=op, sa=0x01), data_in=64)
        assert_good(r)
        assert r.data[1] & 7 == 1  # not supported


async def test_rstmf(target):
    cdb = struct.pack(">BBBBHIBB", 0xA3, 0x0D, 0, 0, 0, 16, 0, 0)
    r = await run(target, cdb, data_in=16)
    assert_good(r)
    assert r.data == bytes((0xDC, 0x03, 0, 0))
    cdb = struct.pack(">BBBBHIBB", 0xA3, 0x0D, 0x80, 0, 0, 16, 0, 0)
    r = await run(target, cdb, data_in=16)
    assert len(r.data) == 16 and r.data[3] == 0x0C


async def test_unknown_service_action(target):
    r = await run(target, struct.pack(">BBQIBB", 0x9E, 0x11, 0, 32, 0, 0), data_in=32)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)
    assert r.field_pointer == (True, 1, 4)


# -- persistent reservation dispatch -------------------------------------------------------


def pr_out(sa, rkey=0, sakey=0, rtype=0):
    params = struct.pack(">QQ4xB3x", rkey, sakey, 0)
    return struct.pack(">BBB2xIB", 0x5F, sa, rtype, len(params), 0), params


async def test_persistent_reservations_through_the_core(target):
    cdb, params = pr_out(0, sakey=0xAAAA)  # REGISTER
    assert_good(await run(target, cdb, data_out=params))
    cdb, params = pr_out(1, rkey=0xAAAA, rtype=1)  # RESERVE write exclusive
    assert_good(await run(target, cdb, data_out=params))
    r = await run(target, struct.pack(">BB5sHB", 0x5E, 0, b"\0" * 5, 64, 0), data_in=64)
    assert_good(r)
    assert struct.unpack(">I", r.data[4:8])[0] == 8
    assert struct.unpack(">Q", r.data[8:16])[0] == 0xAAAA
    # the other initiator may read but not write
    assert_good(await run(target, read10(0, 1), data_in=BS, initiator=INI_B))
    r = await run(target, write10(0, 1), data_out=bytes(BS), initiator=INI_B)
    assert r.resp.response == ServiceResponse.COMMAND_COMPLETE
    assert r.status == ScsiStatus.RESERVATION_CONFLICT and r.resp.sense == b""
    assert_good(await run(target, write10(0, 1), data_out=bytes(BS)))


async def test_huge_pr_out_parameter_list_is_refused(target):
    cdb = struct.pack(">BBB2xIB", 0x5F, 0, 0, (64 << 10) + 1, 0)
    r = await run(target, cdb, data_out=bytes((64 << 10) + 1))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x1A)
