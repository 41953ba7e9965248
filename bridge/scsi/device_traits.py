"""What a backing block device is, from sysfs: what the guest should be told about it.

An image file keeps the core's defaults. For a block device (an SSD, a disk, an LVM
volume, a SAN LUN) the queue limits in /sys/dev/block/MAJ:MIN/queue/ become what the
logical unit reports, so the guest's block layer tunes itself to the real storage:

  rotational            -> Block Device Characteristics VPD MEDIUM ROTATION RATE
                           (SBC-3 6.6.2: 0001h non-rotating; 0000h not reported)
  physical_block_size   -> LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT (READ CAPACITY(16))
  discard_granularity   -> Block Limits VPD OPTIMAL UNMAP GRANULARITY (SBC-3 6.6.4)
  discard_max_bytes     -> Block Limits VPD MAXIMUM UNMAP LBA COUNT
  optimal_io_size       -> Block Limits VPD OPTIMAL TRANSFER LENGTH
  max_hw_sectors_kb     -> Block Limits VPD MAXIMUM TRANSFER LENGTH
                           (never above what the transport carries: block_limits.py)
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

SYSFS = "/sys"


@dataclass(frozen=True)
class DeviceTraits:
    device: str  # "MAJ:MIN"
    name: str  # the kernel's name (sda, loop3, dm-1)
    logical_block_size: int
    physical_block_size: int
    rotational: bool
    optimal_io_size: int  # bytes, 0: none reported
    discard_granularity: int  # bytes, 0 with discard_max_bytes 0: no discard
    discard_max_bytes: int
    max_io_bytes: int  # max_hw_sectors_kb in bytes, 0: not reported


def _read_int(base: str, name: str) -> int:
    try:
        with open(f"{base}/queue/{name}") as f:
            text = f.read().strip()
    except OSError:
        return 0
    return int(text) if text.isascii() and text.isdigit() else 0


def device_traits(fd: int, sysfs: str = SYSFS) -> DeviceTraits | None:
    """The traits of the block device open on ``fd``; None for anything else."""
    st = os.fstat(fd)
    if not stat.S_ISBLK(st.st_mode):
        return None
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    base = f"{sysfs}/dev/block/{major}:{minor}"
    try:
        name = os.path.basename(os.path.realpath(base))
    except OSError:
        name = "?"
    return DeviceTraits(
        device=f"{major}:{minor}", name=name,
        logical_block_size=_read_int(base, "logical_block_size"),
        physical_block_size=_read_int(base, "physical_block_size"),
        rotational=_read_int(base, "rotational") == 1,
        optimal_io_size=_read_int(base, "optimal_io_size"),
        discard_granularity=_read_int(base, "discard_granularity"),
        discard_max_bytes=_read_int(base, "discard_max_bytes"),
        max_io_bytes=_read_int(base, "max_hw_sectors_kb") * 1024,
    )


def physical_block_size(traits: DeviceTraits | None, block_size: int) -> int | None:
    """The device's physical block size when it is a power-of-two multiple of the LU's
    logical block (what READ CAPACITY(16) can express), else None."""
    if traits is None or traits.physical_block_size <= block_size:
        return None
    ratio, rest = divmod(traits.physical_block_size, block_size)
    if rest or ratio & (ratio - 1) or ratio > 1 << 15:
        return None
    return traits.physical_block_size
