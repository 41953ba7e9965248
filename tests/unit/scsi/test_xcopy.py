"""EXTENDED COPY (LID1), RECEIVE COPY RESULTS and the Third-party Copy VPD page."""

from __future__ import annotations

import struct

import pytest

from bridge.scsi import spc_xcopy as xc
from bridge.scsi.logical_unit import LogicalUnitSpec
from bridge.scsi.target import Target

from .helpers import INI_A, INI_B, MiB, assert_check, assert_good, read10, run, write10

BS = 512


@pytest.fixture
def target(tmp_path):
    t = Target([LogicalUnitSpec(name="a", path=str(tmp_path / "a.img"), size=4 * MiB),
                LogicalUnitSpec(name="b", path=str(tmp_path / "b.img"), size=4 * MiB),
                LogicalUnitSpec(name="k", path=str(tmp_path / "k.img"), size=4 * MiB,
                                block_size=4096),
                LogicalUnitSpec(name="hidden", path=str(tmp_path / "h.img"), size=MiB)],
               {INI_A: {0: "a", 1: "b", 2: "k"}, INI_B: {0: "a", 1: "hidden"}})
    yield t
    t.close()


def cscd(t, name, block_size=None, code=0xE4, pdt=0):
    lu = t.logical_unit(name)
    d = bytearray(32)
    d[0], d[1] = code, pdt
    d[4:8] = bytes((0x01, 0x03, 0, len(lu.identity.wwn)))
    d[8 : 8 + len(lu.identity.wwn)] = lu.identity.wwn
    d[29:32] = (block_size or lu.block_size).to_bytes(3, "big")
    return bytes(d)


def seg(src, dst, nblocks, src_lba, dst_lba, code=0x02, dc=0):
    return struct.pack(">BBHHHHHQQ", code, dc << 1, 0x18, src, dst, 0, nblocks, src_lba, dst_lba)


def params(cscds, segs, list_id=1, usage=0x2):
    c, s = b"".join(cscds), b"".join(segs)
    return struct.pack(">BBHIII", list_id, usage << 3, len(c), 0, len(s), 0) + c + s


def xcopy(plen):
    return struct.pack(">BB8sIBB", 0x83, 0x00, bytes(8), plen, 0, 0)


def rcr(sa, list_id=0, alloc=1024):
    return struct.pack(">BBB7sIBB", 0x84, sa, list_id, bytes(7), alloc, 0, 0)


async def xcopy_run(t, p, **kw):
    return await run(t, xcopy(len(p)), data_out=p, **kw)


async def test_copy_within_one_lu(target):
    data = bytes(range(256)) * 2 * 8
    assert_good(await run(target, write10(0, 8), data_out=data))
    p = params([cscd(target, "a")], [seg(0, 0, 8, 0, 100)])
    assert_good(await xcopy_run(target, p))
    assert (await run(target, read10(100, 8), data_in=8 * BS)).data == data


async def test_copy_across_lus_and_block_sizes(target):
    data = b"\x5a" * (8 * BS)
    assert_good(await run(target, write10(16, 8), data_out=data))
    # a (512) -> k (4096): 8 source blocks = 1 destination block
    p = params([cscd(target, "a"), cscd(target, "k")], [seg(0, 1, 8, 16, 3)])
    assert_good(await xcopy_run(target, p))
    assert (await run(target, read10(3, 1), data_in=4096, lun=2)).data == data
    # DC=1: NUMBER OF BLOCKS in destination blocks: k -> b
    p = params([cscd(target, "k"), cscd(target, "b")], [seg(0, 1, 8, 3, 0, dc=1)])
    assert_good(await xcopy_run(target, p))
    assert (await run(target, read10(0, 8), data_in=8 * BS, lun=1)).data == data
    # 3 source blocks of 512 are not whole 4096-byte blocks
    p = params([cscd(target, "a"), cscd(target, "k")], [seg(0, 1, 3, 0, 0)])
    assert_check(await xcopy_run(target, p), 0x05, 0x26)


async def test_overlapping_copy_forward(target):
    data = b"".join(bytes((i,)) * BS for i in range(8))
    assert_good(await run(target, write10(0, 8), data_out=data))
    xc_chunk = xc.COPY_CHUNK_BYTES
    try:
        xc.COPY_CHUNK_BYTES = 2 * BS  # several pieces, so their order matters
        p = params([cscd(target, "a")], [seg(0, 0, 8, 0, 3)])
        assert_good(await xcopy_run(target, p))
    finally:
        xc.COPY_CHUNK_BYTES = xc_chunk
    assert (await run(target, read10(3, 8), data_in=8 * BS)).data == data


async def test_parameter_list_checks(target):
    good = params([cscd(target, "a")], [seg(0, 0, 8, 0, 100)])
    assert_good(await run(target, xcopy(0)))  # nothing to do
    r = await run(target, xcopy(len(good) - 1), data_out=good[:-1])
    assert_check(r, 0x05, 0x1A)  # PARAMETER LIST LENGTH ERROR
    r = await run(target, xcopy(16 + 31), data_out=good[: 16 + 31])
    assert_check(r, 0x05, 0x1A)
    too_many = params([cscd(target, "a")] * (xc.MAX_CSCD_DESCRIPTORS + 1), [seg(0, 0, 1, 0, 9)])
    assert_check(await xcopy_run(target, too_many), 0x05, 0x26, 0x06)
    too_many = params([cscd(target, "a")], [seg(0, 0, 1, 0, 9)] * (xc.MAX_SEGMENT_DESCRIPTORS + 1))
    assert_check(await xcopy_run(target, too_many), 0x05, 0x26, 0x08)
    too_long = params([cscd(target, "a")] * 5, [seg(0, 0, 1, 0, 9)] * 36)
    assert_check(await xcopy_run(target, too_long), 0x05, 0x1A)
    bad = params([cscd(target, "a", code=0xE0)], [seg(0, 0, 1, 0, 9)])
    assert_check(await xcopy_run(target, bad), 0x05, 0x26, 0x07)
    bad = params([cscd(target, "a")], [seg(0, 0, 1, 0, 9, code=0x03)])
    assert_check(await xcopy_run(target, bad), 0x05, 0x26, 0x09)
    bad = params([cscd(target, "a", block_size=4096)], [seg(0, 0, 1, 0, 9)])
    assert_check(await xcopy_run(target, bad), 0x05, 0x26)


async def test_copy_aborted_cases(target):
    n = 4 * MiB // BS
    # destination CSCD index beyond the list
    p = params([cscd(target, "a")], [seg(0, 1, 8, 0, 100)])
    assert_check(await xcopy_run(target, p), 0x0A, 0x08, 0x04)
    # beyond the end of the medium
    p = params([cscd(target, "a")], [seg(0, 0, 8, 0, n - 1)])
    assert_check(await xcopy_run(target, p), 0x0A, 0x00, 0x00)
    # an LU this initiator does not see is unreachable, even by its NAA
    p = params([cscd(target, "hidden")], [seg(0, 0, 1, 0, 1)])
    assert_check(await xcopy_run(target, p), 0x0A, 0x08, 0x04)
    assert_good(await xcopy_run(target, params([cscd(target, "hidden")], [seg(0, 0, 1, 0, 1)]),
                                initiator=INI_B))


async def test_receive_copy_results(target):
    r = await run(target, rcr(0x03), data_in=1024)
    assert_good(r)
    d = r.data
    assert struct.unpack_from(">I", d, 0)[0] == len(d) - 4
    assert struct.unpack_from(">HHII", d, 8) == (xc.MAX_CSCD_DESCRIPTORS, xc.MAX_SEGMENT_DESCRIPTORS,
                                                 xc.MAX_DESCRIPTOR_LIST_LENGTH, xc.MAX_SEGMENT_BYTES)
    assert d[43] == 2 and set(d[44:46]) == {0x02, 0xE4}
    # no copy held for list 7
    r = await run(target, rcr(0x00, 7), data_in=1024)
    assert_check(r, 0x05, 0x24)
    # held (LIST ID USAGE 00b), reported once
    p = params([cscd(target, "a")], [seg(0, 0, 8, 0, 100), seg(0, 0, 8, 8, 200)], list_id=7, usage=0)
    assert_good(await xcopy_run(target, p))
    r = await run(target, rcr(0x00, 7), data_in=1024)
    assert_good(r)
    assert struct.unpack(">IBHBI", r.data) == (8, 0x01, 2, 0, 16 * BS)
    assert_check(await run(target, rcr(0x00, 7), data_in=1024), 0x05, 0x24)
    # not held with LIST ID USAGE 10b, nor for another initiator
    p = params([cscd(target, "a")], [seg(0, 0, 8, 0, 100)], list_id=8, usage=0)
    assert_good(await xcopy_run(target, p))
    assert_check(await run(target, rcr(0x00, 8), data_in=1024, initiator=INI_B), 0x05, 0x24)
    p = params([cscd(target, "a")], [seg(0, 0, 8, 0, 100)], list_id=9, usage=2)
    assert_good(await xcopy_run(target, p))
    assert_check(await run(target, rcr(0x00, 9), data_in=1024), 0x05, 0x24)
    # a copy that failed validation holds nothing
    p = params([cscd(target, "a")], [seg(0, 1, 8, 0, 100)], list_id=10, usage=0)
    assert_check(await xcopy_run(target, p), 0x0A, 0x08, 0x04)
    assert_check(await run(target, rcr(0x00, 10), data_in=1024), 0x05, 0x24)


async def test_third_party_copy_vpd(target):
    r = await run(target, bytes((0x12, 1, 0x8F, 0x04, 0x00, 0)), data_in=1024)
    assert_good(r)
    d = r.data
    assert d[1] == 0x8F and struct.unpack_from(">H", d, 2)[0] == len(d) - 4
    off, found = 4, {}
    while off < len(d):
        dtype, dlen = struct.unpack_from(">HH", d, off)
        assert dlen % 4 == 0
        found[dtype] = d[off + 4 : off + 4 + dlen]
        off += 4 + dlen
    assert set(found) == {0x0001, 0x0008, 0x0009}
    cmds = found[0x0001]
    assert cmds[1 : 1 + cmds[0]] == bytes((0x83, 1, 0x00, 0x84, 2, 0x00, 0x03))
    assert struct.unpack_from(">HH", found[0x0008], 2) == (xc.MAX_CSCD_DESCRIPTORS,
                                                           xc.MAX_SEGMENT_DESCRIPTORS)


async def test_read_only_destination(tmp_path):
    t = Target([LogicalUnitSpec(name="a", path=str(tmp_path / "a.img"), size=MiB),
                LogicalUnitSpec(name="ro", path=str(tmp_path / "ro.img"), size=MiB, read_only=True)],
               {INI_A: {0: "a", 1: "ro"}})
    try:
        p = params([cscd(t, "ro"), cscd(t, "a")], [seg(0, 1, 1, 0, 0)])
        assert_good(await xcopy_run(t, p))  # from the read-only LU: fine
        p = params([cscd(t, "a"), cscd(t, "ro")], [seg(0, 1, 1, 0, 0)])
        assert_check(await xcopy_run(t, p), 0x0A, 0x27)
    finally:
        t.close()
