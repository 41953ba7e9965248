"""Physical block size (issue 13): 512e disks, READ CAPACITY(16) and Block Limits."""

from __future__ import annotations

import struct

import pytest

from bridge.scsi.logical_unit import LogicalUnitSpec

from .helpers import assert_good, make_target, run

RC16 = struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0)
INQ_B0 = bytes((0x12, 0x01, 0xB0, 0x00, 0xFF, 0x00))


@pytest.mark.parametrize(("block_size", "physical", "exponent"), [
    (512, None, 0), (512, 512, 0), (512, 4096, 3), (4096, None, 0), (512, 1 << 20, 11),
])
async def test_read_capacity_16_physical_exponent(tmp_path, block_size, physical, exponent):
    t = make_target(tmp_path, block_size=block_size, physical_block_size=physical)
    try:
        r = await run(t, RC16, data_in=32)
        assert_good(r)
        assert struct.unpack_from(">I", r.data, 8)[0] == block_size
        assert r.data[13] & 0x0F == exponent
        assert struct.unpack_from(">H", r.data, 14)[0] & 0x3FFF == 0  # LOWEST ALIGNED LBA
        assert r.data[14] & 0xC0 == 0xC0  # LBPME, LBPRZ unchanged
        r = await run(t, INQ_B0, data_in=255)
        granularity = struct.unpack_from(">H", r.data, 6)[0]
        unmap_granularity = struct.unpack_from(">I", r.data, 28)[0]
        phys = physical or block_size
        assert granularity == max(4096, phys) // block_size
        assert unmap_granularity == max(4096, phys) // block_size
    finally:
        t.close()


@pytest.mark.parametrize("physical", [256, 1024 + 512, 3 * 512, 1 << 25])
def test_physical_block_size_validated(tmp_path, physical):
    spec = LogicalUnitSpec(name="x", path=str(tmp_path / "x"), size=1 << 20,
                           physical_block_size=physical)
    with pytest.raises(ValueError, match="physical_block_size"):
        spec.validate()
