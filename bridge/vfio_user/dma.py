"""Guest memory as the vfio-user client mapped it (DMA_MAP / DMA_UNMAP).

Regions that come with a file descriptor are mmap'd MAP_SHARED (PROT_READ
only when the client mapped them read-only) and handed out as memoryviews;
regions without one (QEMU's ROMs, or all RAM when it is not share=on) are
only recorded, and reachable through DMA_READ/DMA_WRITE messages to the
client (``read``/``write``, when the server gave us a transport).
"""

from __future__ import annotations

import bisect
import errno
import gc
import logging
import mmap
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from bridge.vfio_user.device import DmaError

log = logging.getLogger("bridge.vfio_user.dma")

PAGE_SIZE = mmap.PAGESIZE
# How long a DMA_UNMAP reply waits for requests in flight to drop their views into
# the region (QEMU waits for the reply with the BQL held: keep it short).
UNMAP_SETTLE_TIMEOUT = 2.0


class DmaMapError(Exception):
    def __init__(self, err: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = err


@dataclass(slots=True, eq=False)
class DmaRegion:
    iova: int
    size: int
    readable: bool
    writable: bool
    mm: mmap.mmap | None = None
    view: memoryview | None = None  # over exactly [iova, iova+size)
    file_offset: int = 0

    @property
    def end(self) -> int:
        return self.iova + self.size

    def release(self) -> bool:
        """Unmap; False while the device still holds memoryviews into it."""
        if self.view is not None:
            self.view.release()  # views sliced from it keep their own export
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                return False
        self.mm = None
        self.view = None
        return True


# DmaTransport(command, address, count_or_data) -> bytes ; set by the server.
DmaReadFn = Callable[[int, int], Awaitable[bytes]]
DmaWriteFn = Callable[[int, bytes], Awaitable[None]]


class DmaSpaceImpl:
    """DmaSpace over the client's DMA maps, sorted by iova for O(log n) lookup."""

    def __init__(self, max_maps: int = 65535, max_fd_maps: int = 65535,
                 max_mapped_bytes: int = 1 << 64) -> None:
        # The connection's budget (budget.py): maps in all; maps holding an
        # fd (each mmap keeps a duplicate of it); bytes mmap'd.
        self.max_maps = max_maps
        self.max_fd_maps = max_fd_maps
        self.max_mapped_bytes = max_mapped_bytes
        self.fd_maps = 0  # mmap'd regions not yet released, deferred ones included
        self.mapped_bytes = 0
        self._starts: list[int] = []
        self._regions: list[DmaRegion] = []
        # Unmapped while the device still held views: retried on every unmap.
        self._zombies: list[DmaRegion] = []
        # Zombies of the latest unmap, which its reply waits for (settle).
        self.unsettled: list[DmaRegion] = []
        self._unmap_callbacks: list[Callable[[int, int], None]] = []
        self._remote_read: DmaReadFn | None = None
        self._remote_write: DmaWriteFn | None = None
        self.max_transfer = 1 << 20

    # --- DMA_MAP / DMA_UNMAP -------------------------------------------------

    def map(self, iova: int, size: int, flags_read: bool, flags_write: bool,
            fd: int | None, file_offset: int) -> DmaRegion:
        """Record a mapping; mmap ``fd`` if given. The caller keeps ``fd``'s ownership."""
        if size <= 0 or iova < 0 or iova + size > 1 << 64:
            raise DmaMapError(errno.EINVAL, f"bad range {iova:#x}+{size:#x}")
        if len(self._regions) >= self.max_maps:
            raise DmaMapError(errno.ENOSPC, f"more than {self.max_maps} maps")
        i = bisect.bisect_right(self._starts, iova)
        if i > 0 and self._regions[i - 1].end > iova:
            raise DmaMapError(errno.EEXIST, f"{iova:#x}+{size:#x} overlaps a mapping")
        if i < len(self._regions) and self._regions[i].iova < iova + size:
            raise DmaMapError(errno.EEXIST, f"{iova:#x}+{size:#x} overlaps a mapping")
        region = DmaRegion(iova, size, flags_read, flags_write, file_offset=file_offset)
        if fd is not None:
            if self.fd_maps >= self.max_fd_maps:
                raise DmaMapError(errno.ENOSPC, f"more than {self.max_fd_maps} maps with a "
                                  "file descriptor (the connection's fd budget)")
            if self.mapped_bytes + size > self.max_mapped_bytes:
                raise DmaMapError(errno.ENOSPC, f"more than {self.max_mapped_bytes:#x} bytes "
                                  "mapped (the connection's budget)")
            self._mmap(region, fd, file_offset)
            self.fd_maps += 1
            self.mapped_bytes += size
        self._starts.insert(i, iova)
        self._regions.insert(i, region)
        return region

    def _mmap(self, region: DmaRegion, fd: int, file_offset: int) -> None:
        prot = 0
        if region.readable:
            prot |= mmap.PROT_READ
        if region.writable:
            prot |= mmap.PROT_WRITE | mmap.PROT_READ
        if prot == 0:
            raise DmaMapError(errno.EINVAL, "mapping neither readable nor writable")
        # mmap offsets must be page aligned: map from the page below.
        base = file_offset - file_offset % mmap.ALLOCATIONGRANULARITY
        skew = file_offset - base
        try:
            st = os.fstat(fd)
            if file_offset + region.size > st.st_size:
                raise DmaMapError(errno.EINVAL, "mapping extends past the end of its file")
            mm = mmap.mmap(fd, region.size + skew, flags=mmap.MAP_SHARED, prot=prot,
                           offset=base)
        except OSError as exc:
            raise DmaMapError(exc.errno or errno.EINVAL, f"mmap failed: {exc}") from None
        except (ValueError, OverflowError) as exc:
            raise DmaMapError(errno.EINVAL, f"mmap failed: {exc}") from None
        region.mm = mm
        region.view = memoryview(mm)[skew : skew + region.size]

    def unmap(self, iova: int, size: int) -> list[DmaRegion]:
        """Remove the mappings wholly inside [iova, iova+size).

        An exact match is the usual case (vfio-user.rst DMA_UNMAP); a range
        that cuts a mapping in two is refused with EINVAL, one that covers
        no mapping with ENOENT.
        """
        end = iova + size
        lo = bisect.bisect_left(self._starts, iova)
        if lo > 0 and self._regions[lo - 1].end > iova:
            raise DmaMapError(errno.EINVAL, f"unmap {iova:#x}+{size:#x} splits a mapping")
        hi = lo
        while hi < len(self._regions) and self._regions[hi].iova < end:
            if self._regions[hi].end > end:
                raise DmaMapError(errno.EINVAL, f"unmap {iova:#x}+{size:#x} splits a mapping")
            hi += 1
        if hi == lo:
            raise DmaMapError(errno.ENOENT, f"unmap {iova:#x}+{size:#x}: no such mapping")
        removed = self._regions[lo:hi]
        del self._regions[lo:hi]
        del self._starts[lo:hi]
        self._release(removed)
        return removed

    def unmap_all(self) -> None:
        removed = self._regions
        self._regions = []
        self._starts = []
        self._release(removed)

    def on_unmap(self, callback: Callable[[int, int], None]) -> None:
        self._unmap_callbacks.append(callback)

    def _release(self, regions: list[DmaRegion]) -> None:
        for r in regions:
            for callback in self._unmap_callbacks:
                try:
                    callback(r.iova, r.size)
                except Exception:
                    log.exception("unmap callback for %#x+%#x failed", r.iova, r.size)
        pending = self._zombies + regions
        self._zombies = [r for r in pending if not self._release_one(r)]
        if self._zombies:
            # Views dropped by the device may still sit in reference cycles
            # (e.g. a traceback's frames): collect once before giving up.
            gc.collect()
            self._zombies = [r for r in self._zombies if not self._release_one(r)]
        self.unsettled = [r for r in regions if r in self._zombies]

    async def settle(self, timeout: float = UNMAP_SETTLE_TIMEOUT) -> None:
        """Wait (bounded) until requests in flight dropped their views into the regions
        of the latest unmap, so that its reply is true (vfio-user.rst DMA_UNMAP)."""
        with trio.move_on_after(timeout):
            while self.unsettled:
                await trio.sleep(0.001)
                self._zombies = [r for r in self._zombies if not self._release_one(r)]
                self.unsettled = [r for r in self.unsettled if r in self._zombies]
        if self.unsettled:
            log.warning("DMA unmap answered while the device still holds views into %s",
                        ", ".join(f"{r.iova:#x}+{r.size:#x}" for r in self.unsettled))
            self.unsettled = []

    def _release_one(self, region: DmaRegion) -> bool:
        had_fd = region.mm is not None
        if not region.release():
            return False
        if had_fd:  # its fd and address space are given back only now
            self.fd_maps -= 1
            self.mapped_bytes -= region.size
        return True

    @property
    def deferred_unmaps(self) -> int:
        return len(self._zombies)

    def __len__(self) -> int:
        return len(self._regions)

    def regions(self) -> list[DmaRegion]:
        return list(self._regions)

    # --- DmaSpace --------------------------------------------------------------

    def _find(self, iova: int) -> DmaRegion | None:
        i = bisect.bisect_right(self._starts, iova) - 1
        if i < 0:
            return None
        region = self._regions[i]
        return region if iova < region.end else None

    def view(self, iova: int, length: int, writable: bool) -> memoryview:
        return self._view_in(self._find(iova), iova, length, writable)

    @staticmethod
    def _view_in(region: DmaRegion | None, iova: int, length: int, writable: bool
                 ) -> memoryview:
        """``view`` once the mapping holding ``iova`` was looked up (every check made here)."""
        if region is None or length < 0 or iova + length > region.end:
            raise DmaError(f"{iova:#x}+{length:#x} is not inside one DMA mapping")
        if region.view is None:
            raise DmaError(f"{iova:#x}+{length:#x} is in a mapping without fd (DMA_READ/WRITE only)")
        if writable and not region.writable:
            raise DmaError(f"{iova:#x}+{length:#x} is mapped read-only")
        if not writable and not region.readable:
            raise DmaError(f"{iova:#x}+{length:#x} is mapped write-only")
        off = iova - region.iova
        return region.view[off : off + length]

    def views(self, iova: int, length: int, writable: bool, limit: int | None = None
              ) -> list[memoryview]:
        """Like ``view`` but allowing the range to span adjacent mappings (``limit`` at most)."""
        out = []
        while length > 0:
            if limit is not None and len(out) >= limit:
                raise DmaError(f"{iova:#x}+{length:#x} spans more than {limit} DMA mappings")
            region = self._find(iova)
            if region is None:
                raise DmaError(f"{iova:#x}+{length:#x} is not inside DMA mappings")
            n = min(length, region.end - iova)
            out.append(self._view_in(region, iova, n, writable))
            iova += n
            length -= n
        return out

    # --- DMA_READ / DMA_WRITE fallback -------------------------------------------

    def set_remote(self, read: DmaReadFn | None, write: DmaWriteFn | None,
                   max_transfer: int) -> None:
        self._remote_read = read
        self._remote_write = write
        self.max_transfer = max_transfer

    def _check_remote(self, iova: int, length: int, writable: bool) -> None:
        pos = iova
        while pos < iova + length:
            region = self._find(pos)
            if region is None:
                raise DmaError(f"{pos:#x} is not in a DMA mapping")
            if writable and not region.writable:
                raise DmaError(f"{pos:#x} is mapped read-only")
            pos = region.end

    async def read(self, iova: int, length: int) -> bytes:
        """Guest memory copied out: from the mmap, or by DMA_READ messages."""
        try:
            return b"".join(bytes(v) for v in self.views(iova, length, False))
        except DmaError:
            if self._remote_read is None:
                raise
        self._check_remote(iova, length, False)
        parts = []
        done = 0
        while done < length:
            n = min(self.max_transfer, length - done)
            parts.append(await self._remote_read(iova + done, n))
            done += n
        return b"".join(parts)

    async def write(self, iova: int, data: bytes) -> None:
        """Copy ``data`` into guest memory: into the mmap, or by DMA_WRITE messages."""
        try:
            targets = self.views(iova, len(data), True)
        except DmaError:
            if self._remote_write is None:
                raise
        else:
            pos = 0
            for v in targets:
                v[:] = data[pos : pos + len(v)]
                pos += len(v)
            return
        self._check_remote(iova, len(data), True)
        done = 0
        while done < len(data):
            n = min(self.max_transfer, len(data) - done)
            await self._remote_write(iova + done, bytes(data[done : done + n]))
            done += n
