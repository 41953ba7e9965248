"""Block limits the core enforces and reports in VPD page B0h (SBC-3 6.6.4).

The transfer limits depend on the path: a transport declares how many bytes one
command can carry on its target port (``TargetPort.max_transfer_bytes``: virtio's
max_sectors x 512, xen-scsifront's (segments - 1) x 4 KiB). The Block Limits page a
guest reads through that port, and the limit the core enforces on it, are that byte
limit divided by the logical block size (capped at the core's own ceiling), so a guest
is never told it may send a transfer its own driver refuses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .request import TargetPort

MAX_TRANSFER_BYTES = 8 << 20  # the core's ceiling, for a port that declares no limit
OPTIMAL_TRANSFER_BYTES = 1 << 20
OPTIMAL_GRANULARITY_BYTES = 4096
# In logical blocks. libiscsi's conformance suite calls a MAXIMUM UNMAP LBA COUNT above
# 2^20 "insane", and reads back a whole WRITE SAME range in one command when MAXIMUM
# WRITE SAME LENGTH allows 65536 blocks (more than a guest's SG_IO can move).
MAX_UNMAP_LBA_COUNT = 1 << 20  # per UNMAP command, all descriptors together
MAX_UNMAP_DESCRIPTORS = 256
UNMAP_GRANULARITY_BYTES = 4096
MAX_WRITE_SAME_LENGTH = 0xFFFF
MAX_COMPARE_AND_WRITE_BLOCKS = 32  # NUMBER OF LOGICAL BLOCKS is one byte; we take <= 32


def blocks(nbytes: int, block_size: int) -> int:
    return max(1, nbytes // block_size)


def max_transfer_bytes(port: TargetPort | None) -> int:
    """The bytes one READ/WRITE/VERIFY may move through ``port`` (SBC-3 6.6.4)."""
    limit = port.max_transfer_bytes if port is not None else None
    return MAX_TRANSFER_BYTES if limit is None else min(limit, MAX_TRANSFER_BYTES)


def max_transfer_blocks(port: TargetPort | None, block_size: int) -> int:
    """MAXIMUM TRANSFER LENGTH in logical blocks: whole blocks only."""
    return max(1, max_transfer_bytes(port) // block_size)


def optimal_transfer_blocks(port: TargetPort | None, block_size: int) -> int:
    """OPTIMAL TRANSFER LENGTH: at most the maximum (SBC-3 6.6.4)."""
    return blocks(min(OPTIMAL_TRANSFER_BYTES, max_transfer_bytes(port)), block_size)
