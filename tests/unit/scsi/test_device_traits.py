"""A block device's sysfs traits in the VPD pages (bridge/scsi/device_traits.py): each
trait changes its field, and an image file keeps the defaults."""

from __future__ import annotations

import struct

from bridge.scsi import block_limits as bl
from bridge.scsi.device_traits import DeviceTraits, physical_block_size

from .helpers import INI_A, assert_good, run

SSD = DeviceTraits(device="8:0", name="sda", logical_block_size=512, physical_block_size=4096,
                   rotational=False, optimal_io_size=128 << 10, discard_granularity=64 << 10,
                   discard_max_bytes=32 << 20, max_io_bytes=512 << 10)


async def vpd(target, page: int) -> bytes:
    r = await run(target, bytes((0x12, 1, page, 0, 64, 0)), data_in=64, initiator=INI_A)
    assert_good(r)
    return r.data


async def test_an_image_file_keeps_the_defaults(target):
    assert target.logical_unit("disk0").traits is None
    assert struct.unpack_from(">H", await vpd(target, 0xB1), 4)[0] == 1  # non-rotating
    b0 = await vpd(target, 0xB0)
    assert struct.unpack_from(">I", b0, 20)[0] == bl.MAX_UNMAP_LBA_COUNT


async def test_device_traits_narrow_the_block_limits(target):
    lu = target.logical_unit("disk0")
    lu.traits = SSD
    b0 = await vpd(target, 0xB0)
    max_transfer, optimal = struct.unpack_from(">II", b0, 8)
    assert (max_transfer, optimal) == ((512 << 10) // 512, (128 << 10) // 512)
    max_unmap, _descs, granularity = struct.unpack_from(">III", b0, 20)
    assert (max_unmap, granularity) == ((32 << 20) // 512, (64 << 10) // 512)
    assert struct.unpack_from(">H", await vpd(target, 0xB1), 4)[0] == 1
    lu.traits = DeviceTraits(**{**SSD.__dict__, "rotational": True})
    assert struct.unpack_from(">H", await vpd(target, 0xB1), 4)[0] == 0  # rate not reported


def test_physical_block_size_only_when_expressible():
    assert physical_block_size(SSD, 512) == 4096
    assert physical_block_size(SSD, 4096) is None  # not larger than the logical block
    odd = DeviceTraits(**{**SSD.__dict__, "physical_block_size": 1536})
    assert physical_block_size(odd, 512) is None
    assert physical_block_size(None, 512) is None
