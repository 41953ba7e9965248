"""Block limits the core enforces and reports in VPD page B0h (SBC-3 6.6.4)."""

from __future__ import annotations

MAX_TRANSFER_BYTES = 8 << 20  # READ/WRITE/VERIFY: larger transfer lengths get 24h/00h
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
