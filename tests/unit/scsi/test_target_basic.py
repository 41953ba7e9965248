"""Dispatch, LUN addressing, TUR, INQUIRY, READ CAPACITY, READ/WRITE, REPORT LUNS."""

from __future__ import annotations

import os
import struct

import pytest

from bridge.scsi.request import (
    REPORT_LUNS_WLUN,
    InitiatorPort,
    ScsiRequest,
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
    read16,
    run,
    write10,
    write16,
)

TUR = bytes(6)


@pytest.fixture
def target(tmp_path):
    t = make_target(tmp_path, extra_luns=True)
    yield t
    t.close()


async def test_power_on_unit_attention_then_tur_good(target):
    r = await run(target, TUR, clear_ua=False)
    assert_check(r, SenseKey.UNIT_ATTENTION, 0x29, 0x01)
    r = await run(target, TUR, clear_ua=False)
    assert_good(r)
    # the other initiator has its own nexus and still sees its POWER ON
    r = await run(target, TUR, initiator=INI_B, clear_ua=False)
    assert_check(r, SenseKey.UNIT_ATTENTION, 0x29, 0x01)


async def test_inquiry_does_not_consume_ua(target):
    r = await run(target, bytes((0x12, 0, 0, 0, 96, 0)), data_in=96, clear_ua=False)
    assert_good(r)
    r = await run(target, TUR, clear_ua=False)
    assert_check(r, SenseKey.UNIT_ATTENTION, 0x29, 0x01)


async def test_standard_inquiry(target):
    r = await run(target, bytes((0x12, 0, 0, 0, 96, 0)), data_in=255)
    assert_good(r)
    d = r.data
    assert len(d) == 96 and r.resp.residual == 255 - 96
    assert d[0] == 0x00 and d[2] == 0x06 and d[3] & 0x0F == 2 and d[7] & 0x02
    assert d[4] == 91
    assert d[8:16] == b"VSCSIBRG" and d[16:32] == b"vscsi-bridge    "


async def test_inquiry_truncated_by_allocation_length_and_by_buffer(target):
    r = await run(target, bytes((0x12, 0, 0, 0, 36, 0)), data_in=96)
    assert_good(r)
    assert len(r.data) == 36 and r.resp.residual == 60
    # a data-in buffer shorter than the allocation length just truncates
    r = await run(target, bytes((0x12, 0, 0, 0, 96, 0)), data_in=5)
    assert_good(r)
    assert len(r.data) == 5 and r.resp.residual == 0


async def test_inquiry_page_code_without_evpd_is_invalid(target):
    r = await run(target, bytes((0x12, 0, 0x80, 0, 96, 0)), data_in=96)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)
    assert r.field_pointer == (True, 2, None)


async def test_inquiry_reserved_bit_points_at_bit(target):
    r = await run(target, bytes((0x12, 0x02, 0, 0, 96, 0)), data_in=96)  # CMDDT (obsolete)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)
    assert r.field_pointer == (True, 1, 1)


async def test_vpd_pages(target):
    r = await run(target, bytes((0x12, 1, 0x00, 0, 255, 0)), data_in=255)
    assert_good(r)
    assert r.data[1] == 0 and list(r.data[4 : 4 + r.data[3]]) == [0, 0x80, 0x83, 0x8F, 0xB0, 0xB1, 0xB2]
    r = await run(target, bytes((0x12, 1, 0x80, 0, 255, 0)), data_in=255)
    serial = r.data[4:].decode()
    assert serial == target.logical_unit("disk0").identity.serial and len(serial) == 16
    r = await run(target, bytes((0x12, 1, 0x83, 1, 0, 0)), data_in=256)
    d = r.data
    assert struct.unpack(">H", d[2:4])[0] == len(d) - 4
    # first designator: NAA, LU association, binary, 16 bytes, NAA 6
    assert d[4] & 0x0F == 1 and d[5] & 0x30 == 0 and d[5] & 0x0F == 3 and d[7] == 16
    assert d[8] >> 4 == 6
    assert d[8:24] == target.logical_unit("disk0").identity.wwn
    assert b"iqn.2026-11.org.vscsi-bridge:target,t,0x0001\0" in d
    # relative target port designator (type 4, target port association) = 1
    i = 4
    types = {}
    while i < len(d):
        types[(d[i + 1] >> 4 & 3, d[i + 1] & 0xF)] = d[i + 4 : i + 4 + d[i + 3]]
        i += 4 + d[i + 3]
    assert types[(1, 4)] == b"\0\0\0\x01"
    r = await run(target, bytes((0x12, 1, 0xB0, 0, 64, 0)), data_in=64)
    d = r.data
    assert d[3] == 0x3C
    assert struct.unpack(">I", d[8:12])[0] == (8 * MiB) // 512  # max transfer length
    assert struct.unpack(">I", d[20:24])[0] == 1 << 20  # max unmap LBA count
    assert struct.unpack(">I", d[24:28])[0] == 256  # max unmap descriptors
    assert struct.unpack(">Q", d[36:44])[0] == 0xFFFF  # max write same length
    r = await run(target, bytes((0x12, 1, 0xB1, 0, 64, 0)), data_in=64)
    assert struct.unpack(">H", r.data[4:6])[0] == 1
    r = await run(target, bytes((0x12, 1, 0xB2, 0, 64, 0)), data_in=64)
    assert r.data[5] & 0xE4 == 0xE4 and r.data[6] & 7 == 2


async def test_unknown_vpd_page(target):
    r = await run(target, bytes((0x12, 1, 0x89, 0, 64, 0)), data_in=64)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)
    assert r.field_pointer == (True, 2, None)


async def test_read_capacity(target):
    r = await run(target, bytes((0x25,)) + bytes(9), data_in=8)
    assert_good(r)
    assert struct.unpack(">II", r.data) == (4 * MiB // 512 - 1, 512)
    r = await run(target, bytes((0x9E, 0x10)) + bytes(8) + struct.pack(">I", 32) + bytes(2),
                  data_in=32)
    assert_good(r)
    last, bs, _p, _e, lbp = struct.unpack(">QIBBH", r.data[:16])
    assert (last, bs) == (4 * MiB // 512 - 1, 512)
    assert lbp & 0x8000 and lbp & 0x4000  # LBPME, LBPRZ
    r = await run(target, bytes((0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0)), data_in=8)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)  # LBA without PMI


async def test_read_capacity_4k(tmp_path):
    t = make_target(tmp_path, block_size=4096)
    try:
        r = await run(t, bytes((0x25,)) + bytes(9), data_in=8)
        assert struct.unpack(">II", r.data) == (4 * MiB // 4096 - 1, 4096)
    finally:
        t.close()


@pytest.mark.parametrize("rd,wr", [(read10, write10), (read16, write16)])
async def test_write_then_read_roundtrip(target, rd, wr, tmp_path):
    payload = os.urandom(4 * 512)
    r = await run(target, wr(10, 4), data_out=payload)
    assert_good(r)
    assert r.resp.residual == 0
    r = await run(target, rd(10, 4), data_in=4 * 512)
    assert_good(r)
    assert r.data == payload
    with open(tmp_path / "disk0.img", "rb") as f:
        f.seek(10 * 512)
        assert f.read(4 * 512) == payload


async def test_read6_write6_and_12(target):
    payload = os.urandom(512 * 2)
    assert_good(await run(target, bytes((0x0A, 0, 0, 7, 2, 0)), data_out=payload))
    r = await run(target, bytes((0x08, 0, 0, 7, 2, 0)), data_in=1024)
    assert r.data == payload
    r = await run(target, struct.pack(">BBIIBB", 0xA8, 0, 7, 2, 0, 0), data_in=1024)
    assert r.data == payload
    assert_good(await run(target, struct.pack(">BBIIBB", 0xAA, 0x08, 9, 1, 0, 0),
                          data_out=b"x" * 512))
    r = await run(target, read10(9, 1), data_in=512)
    assert r.data == b"x" * 512


async def test_read6_zero_length_means_256_blocks(target):
    r = await run(target, bytes((0x08, 0, 0, 0, 0, 0)), data_in=256 * 512)
    assert_good(r)
    assert len(r.data) == 256 * 512


async def test_scattered_buffers(target):
    payload = os.urandom(3 * 512)
    bufs = [memoryview(payload)[:100], memoryview(payload)[100:1000], memoryview(payload)[1000:]]
    req = ScsiRequest(lun=0, tag=5, cdb=write10(0, 3),
                      initiator=InitiatorPort(INI_A), data_out=bufs)
    await run(target, TUR)
    assert_good_resp = await target.execute(req)
    assert assert_good_resp.status == ScsiStatus.GOOD
    outs = [bytearray(7), bytearray(500), bytearray(3 * 512 - 507 + 100)]
    req = ScsiRequest(lun=0, tag=6, cdb=read10(0, 3), initiator=InitiatorPort(INI_A),
                      data_in=[memoryview(b) for b in outs])
    resp = await target.execute(req)
    assert resp.status == ScsiStatus.GOOD and resp.residual == 100
    assert b"".join(outs)[: 3 * 512] == payload


async def test_read_lba_out_of_range(target):
    last = 4 * MiB // 512
    r = await run(target, read10(last - 1, 2), data_in=1024)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x21)
    r = await run(target, read16(2**64 - 1, 1), data_in=512)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x21)
    assert_good(await run(target, read10(last - 1, 1), data_in=512))


async def test_transfer_length_over_limit_points_at_field(target):
    n = 8 * MiB // 512 + 1
    r = await run(target, struct.pack(">BBIIBB", 0xA8, 0, 0, n, 0, 0), data_in=512)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)
    assert r.field_pointer == (True, 6, None)


async def test_rdprotect_rejected_with_bit_pointer(target):
    r = await run(target, read10(0, 1, flags=0x20), data_in=512)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)
    assert r.field_pointer == (True, 1, 5)


async def test_naca_rejected(target):
    r = await run(target, TUR[:5] + b"\x04")
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)
    assert r.field_pointer == (True, 5, 2)


async def test_fua_dpo_accepted(target):
    assert_good(await run(target, write10(0, 1, flags=0x18), data_out=bytes(512)))
    assert_good(await run(target, read10(0, 1, flags=0x18), data_in=512))


async def test_short_buffers_are_overrun(target):
    r = await run(target, read10(0, 2), data_in=1000)
    assert r.resp.response == ServiceResponse.DATA_OVERRUN
    r = await run(target, write10(0, 2), data_out=bytes(1000))
    assert r.resp.response == ServiceResponse.DATA_OVERRUN
    # wrong direction only: READ with a data-out buffer
    r = await run(target, read10(0, 1), data_out=bytes(512))
    assert r.resp.response == ServiceResponse.DATA_OVERRUN


async def test_longer_buffers_leave_residual(target):
    r = await run(target, read10(0, 1), data_in=4096)
    assert_good(r)
    assert r.resp.residual == 4096 - 512
    r = await run(target, write10(0, 1), data_out=bytes(2048))
    assert_good(r)
    assert r.resp.residual == 2048 - 512


async def test_both_directions_is_failure(target):
    req = ScsiRequest(lun=0, tag=1, cdb=read10(0, 1), initiator=InitiatorPort(INI_A),
                      data_in=[memoryview(bytearray(512))], data_out=[memoryview(bytes(512))])
    resp = await target.execute(req)
    assert resp.response == ServiceResponse.SERVICE_DELIVERY_FAILURE


async def test_zero_length_transfer(target):
    r = await run(target, read10(0, 0))
    assert_good(r)


async def test_invalid_opcode(target):
    r = await run(target, bytes((0xC5,)) + bytes(15))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x20)
    assert r.field_pointer == (True, 0, None)


async def test_read_only_lu(tmp_path):
    t = make_target(tmp_path, read_only=True)
    try:
        r = await run(t, write10(0, 1), data_out=bytes(512))
        assert_check(r, SenseKey.DATA_PROTECT, 0x27)
        assert_good(await run(t, read10(0, 1), data_in=512))
    finally:
        t.close()


async def test_report_luns_per_initiator(target):
    cdb = bytes((0xA0, 0, 0, 0, 0, 0)) + struct.pack(">I", 256) + bytes(2)
    r = await run(target, cdb, data_in=256)
    assert_good(r)
    n = struct.unpack(">I", r.data[:4])[0]
    assert n == 16
    assert r.data[8:16] == bytes(8) and r.data[16:18] == b"\x00\x03"
    r = await run(target, cdb, data_in=256, initiator=INI_B)
    assert struct.unpack(">I", r.data[:4])[0] == 8
    r = await run(target, cdb, data_in=256, initiator="iqn.2026-11.org.test:stranger")
    assert_good(r)
    assert struct.unpack(">I", r.data[:4])[0] == 0


async def test_report_luns_select_report_and_wlun(target):
    base = bytes((0xA0, 0, 0, 0, 0, 0)) + struct.pack(">I", 256) + bytes(2)
    r = await run(target, base[:2] + b"\x01" + base[3:], data_in=256)
    assert struct.unpack(">I", r.data[:4])[0] == 8 and r.data[8:10] == b"\xc1\x01"
    r = await run(target, base[:2] + b"\x02" + base[3:], data_in=256)
    assert struct.unpack(">I", r.data[:4])[0] == 24
    r = await run(target, base[:2] + b"\x05" + base[3:], data_in=256)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)
    assert r.field_pointer == (True, 2, None)
    # through the well-known LUN
    r = await run(target, base, data_in=256, lun=REPORT_LUNS_WLUN)
    assert_good(r)
    assert struct.unpack(">I", r.data[:4])[0] == 16


async def test_report_luns_allocation_length_too_small(target):
    r = await run(target, bytes((0xA0, 0, 0, 0, 0, 0)) + struct.pack(">I", 15) + bytes(2),
                  data_in=16)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)
    assert r.field_pointer == (True, 6, None)


async def test_unmapped_lun(target):
    r = await run(target, bytes((0x12, 0, 0, 0, 96, 0)), data_in=96, lun=7)
    assert_good(r)
    assert r.data[0] == 0x7F
    r = await run(target, TUR, lun=7)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x25)
    r = await run(target, read10(0, 1), data_in=512, lun=7)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x25)
    r = await run(target, bytes((0x03, 0, 0, 0, 18, 0)), data_in=18, lun=7, clear_ua=False)
    assert_good(r)
    assert r.data[2] & 0xF == SenseKey.ILLEGAL_REQUEST and r.data[12] == 0x25
    r = await run(target, bytes((0xA0, 0, 0, 0, 0, 0)) + struct.pack(">I", 64) + bytes(2),
                  data_in=64, lun=7)
    assert_good(r)
    # LUN 3 exists for INI_A only
    r = await run(target, TUR, lun=3, initiator=INI_B)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x25)


async def test_wlun_inquiry_and_tur(target):
    r = await run(target, bytes((0x12, 0, 0, 0, 96, 0)), data_in=96, lun=REPORT_LUNS_WLUN)
    assert r.data[0] == 0x1E
    assert_good(await run(target, TUR, lun=REPORT_LUNS_WLUN))
    r = await run(target, read10(0, 1), data_in=512, lun=REPORT_LUNS_WLUN)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x20)


@pytest.mark.parametrize("lun", [0x4000, 0xFFFF, 2**40])
async def test_lun_beyond_the_map_is_not_supported(target, lun):
    """Whatever integer a transport passes, a LUN outside the map is LU NOT SUPPORTED."""
    r = await run(target, TUR, lun=lun, clear_ua=False)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x25)


async def test_restart_finds_acknowledged_writes(tmp_path):
    written = {}
    t = make_target(tmp_path)
    wwn = t.logical_unit("disk0").identity.wwn
    for i in range(32):
        data = os.urandom(1024)
        r = await run(t, write10(i * 7, 2), data_out=data)
        assert_good(r)
        written[i * 7] = data
    t.close()
    t2 = make_target(tmp_path)
    try:
        assert t2.logical_unit("disk0").identity.wwn == wwn
        for lba, data in written.items():
            r = await run(t2, read10(lba, 2), data_in=1024)
            assert r.data == data
    finally:
        t2.close()


async def test_request_sense_and_vpd_without_a_logical_unit(target):
    # W-LUN: NO SENSE; unmapped LUN: LOGICAL UNIT NOT SUPPORTED in the data, GOOD status
    r = await run(target, bytes((0x03, 0, 0, 0, 18, 0)), data_in=18, lun=REPORT_LUNS_WLUN)
    assert_good(r)
    assert r.data[2] & 0xF == 0 and r.data[12] == 0
    r = await run(target, bytes((0x03, 1, 0, 0, 18, 0)), data_in=18, lun=7, clear_ua=False)
    assert r.data[0] == 0x72 and r.data[1] == SenseKey.ILLEGAL_REQUEST and r.data[2] == 0x25
    r = await run(target, bytes((0x12, 1, 0x00, 0, 64, 0)), data_in=64, lun=7)
    assert_good(r)
    assert r.data[0] == 0x7F and r.data[4] == 0x00
    r = await run(target, bytes((0x12, 1, 0x83, 0, 64, 0)), data_in=64, lun=7)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)


async def test_read_capacity_16_allocation_length(target):
    cdb = bytes((0x9E, 0x10)) + bytes(8) + struct.pack(">I", 12) + bytes(2)
    r = await run(target, cdb, data_in=32)
    assert_good(r)
    assert len(r.data) == 12 and r.resp.residual == 20
    r = await run(target, bytes((0x9E, 0x10)) + bytes(8) + struct.pack(">I", 32) + bytes((0, 0x80)),
                  data_in=32)  # a CONTROL byte vendor bit is ignored
    assert_good(r)


async def test_cdb_shorter_than_its_opcode(target):
    r = await run(target, bytes((0x28, 0, 0, 0)), data_in=512)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x24)
    r = await run(target, b"")
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x20)
