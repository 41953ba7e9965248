"""Block limits the core enforces and reports in VPD page B0h (SBC-3 6.6.4)."""

from __future__ import annotations

MAX_TRANSFER_BYTES = 8 << 20  # READ/WRITE/VERIFY: larger transfer lengths get 24h/00h
OPTIMAL_TRANSFER_BYTES = 1 << 20
OPTIMAL_GRANULARITY_BYTES = 4096
MAX_UNMAP_BYTES = 1 << 30  # per UNMAP command (sum of descriptors) and per WRITE SAME
MAX_UNMAP_DESCRIPTORS = 256
UNMAP_GRANULARITY_BYTES = 4096
MAX_WRITE_SAME_BYTES = 1 << 30
MAX_COMPARE_AND_WRITE_BLOCKS = 32  # NUMBER OF LOGICAL BLOCKS is one byte; we take <= 32


def blocks(nbytes: int, block_size: int) -> int:
    return max(1, nbytes // block_size)
