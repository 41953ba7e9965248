"""What one vfio-user connection may hold: the per-connection resource budget.

A client pins server resources by design: every DMA_MAP with a file
descriptor keeps one descriptor open for the life of the mapping (Python's
``mmap.mmap`` holds a duplicate) and address space for its size; descriptors
sent with a message are ours from the moment recvmsg() returns. Without a
budget one guest can take the whole process's RLIMIT_NOFILE, and then every
other guest's DMA_MAP and the next accept() fail.

The budget is derived from the process's soft RLIMIT_NOFILE when a client
connects: a reserve stays with the process (backing files, listening and
accepted sockets, eventfds, trio, worker threads), the rest is shared among
the vfio-user sockets served, counting at least ``MIN_SHARES`` of them. The
README's "Resource budgets" section states the same numbers.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

from bridge.vfio_user import protocol as p

# Kept for the process itself: max(FD_RESERVE_MIN, limit / FD_RESERVE_DIVISOR).
FD_RESERVE_MIN = 64
FD_RESERVE_DIVISOR = 8
# The fd budget is split among max(sockets served, MIN_SHARES) connections.
MIN_SHARES = 4
# Bounds on one connection's pinned fds, whatever the limit.
MIN_PINNED_FDS = 16
MAX_PINNED_FDS = 1024
# Descriptors received with a message not yet complete: one message carries at
# most MAX_MSG_FDS (what we announce in VERSION), so more is a protocol breach.
FDS_IN_FLIGHT = p.MAX_MSG_FDS
# DMA_MAP entries, with or without fd (QEMU refuses more: proxy.c check_max_dma).
MAX_DMA_MAPS = 65535
# Bytes mmap'd for one connection's DMA maps: address space, and the kernel's
# vm.max_map_count (65530) is shared by the whole process.
MAX_MAPPED_BYTES = 1 << 40  # 1 TiB of guest RAM per connection


@dataclass(frozen=True, slots=True)
class ConnectionBudget:
    pinned_fds: int  # fds one connection may keep open: DMA maps with fd + IRQ eventfds
    fds_in_flight: int  # fds received with an unfinished message
    dma_maps: int  # DMA_MAP entries
    mapped_bytes: int  # total size of the mmap'd DMA maps


def fd_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_budget(sockets: int, nofile: int | None = None) -> ConnectionBudget:
    """The budget of one connection when ``sockets`` vfio-user sockets are served."""
    limit = fd_limit() if nofile is None else nofile
    reserve = max(FD_RESERVE_MIN, limit // FD_RESERVE_DIVISOR)
    share = (limit - reserve) // max(sockets, MIN_SHARES)
    pinned = max(MIN_PINNED_FDS, min(MAX_PINNED_FDS, share))
    return ConnectionBudget(pinned, FDS_IN_FLIGHT, MAX_DMA_MAPS, MAX_MAPPED_BYTES)
