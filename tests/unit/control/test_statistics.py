"""bridge.scsi.statistics through Target.submit: counts by kind, bytes, errors, latency."""

from __future__ import annotations

import struct

from bridge.scsi.statistics import HISTOGRAM_BUCKETS, histogram_bucket_bounds
from tests.unit.scsi.helpers import INI_A, INI_B, make_target, run


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


async def test_counts_reads_writes_errors_per_lu_and_initiator(tmp_path):
    target = make_target(tmp_path, extra_luns=True)
    stats = target.enable_statistics()
    try:
        await run(target, write10(0, 8), data_out=bytes(4096))
        await run(target, read10(0, 8), data_in=4096)
        await run(target, read10(0, 1), data_in=512, initiator=INI_B)
        await run(target, read10(1 << 30, 1), data_in=512)  # LBA out of range
        snap = stats.snapshot()
    finally:
        target.close()
    lu = snap["logical_units"]["disk0"]
    assert lu["commands"]["read"] == 3 and lu["commands"]["write"] == 1
    assert lu["bytes_read"] == 4096 + 512 and lu["bytes_written"] == 4096
    assert lu["errors_by_kind"].get("ILLEGAL REQUEST") == 1
    assert lu["commands"]["other"] >= 1  # the helper drains unit attentions first
    a = snap["initiators"][INI_A]
    b = snap["initiators"][INI_B]
    assert a["bytes_read"] == 4096 and b["bytes_read"] == 512
    assert sum(lu["latency_histogram"]) == sum(lu["commands"].values())
    assert len(lu["latency_histogram"]) == HISTOGRAM_BUCKETS


async def test_reset_and_remap(tmp_path):
    target = make_target(tmp_path, extra_luns=True)
    stats = target.enable_statistics()
    try:
        await run(target, read10(0, 1), data_in=512)
        stats.reset()
        assert stats.snapshot()["logical_units"]["disk0"]["commands"]["read"] == 0
        # LUN 3 of INI_A moves from disk1 to disk0: new commands count for disk0
        await run(target, read10(0, 1), data_in=512, lun=3)
        target.unmap_lun(INI_A, 3)
        target.map_lun(INI_A, 3, "disk0")
        await run(target, read10(0, 1), data_in=512, lun=3)
        snap = stats.snapshot()["logical_units"]
        assert snap["disk1"]["commands"]["read"] == 1
        assert snap["disk0"]["commands"]["read"] == 1
    finally:
        target.close()


def test_bucket_bounds_cover_everything():
    b = histogram_bucket_bounds()
    assert b[0] == (0, 1) and b[-1][1] is None
    assert all(b[i][1] == b[i + 1][0] for i in range(len(b) - 1))
