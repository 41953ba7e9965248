"""Backing store: a raw image file or a block device, read and written with preadv/pwritev.

Data goes straight between the file and the request's memoryviews (guest memory):
no intermediate bytes objects. Reads are tried inline with RWF_NOWAIT (a page-cache
hit never blocks the trio loop) and fall back to a worker thread on EAGAIN or a short
read. A miss that is O_DIRECT-aligned is read with Linux native AIO (aio.py) on a
second, O_DIRECT descriptor of the same file, completed on an eventfd the trio loop
waits for: no thread hop, like QEMU's cache=none with aio=native/io_uring. A direct read
after buffered writes is coherent: the kernel writes the dirty range back first. Where
O_DIRECT is refused (tmpfs before Linux 6.6), the request is unaligned or a buffer is
read-only, the context is full or AIO unavailable, the miss goes to a worker thread.

Writes (measured with tests/bench/core_read_bench.py; a worker-thread hop costs about
100 us of CPU here, a buffered 4 KiB pwritev a few us):
1. where the kernel supports RWF_NOWAIT for buffered writes, inline with it, the
   rest in a thread on EAGAIN;
2. otherwise (ext4 on this kernel answers EOPNOTSUPP) page-aligned writes of at most
   INLINE_WRITE_MAX on a regular file go inline, timed: one that took longer than
   INLINE_WRITE_SLOW (dirty-page throttling, memory pressure) sends every write to
   threads for INLINE_WRITE_BACKOFF seconds. Unaligned writes may need a page read
   first and always go to a thread, as do block devices and synchronous writes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence

import trio

from . import aio
from .buffers import skip, zero

log = logging.getLogger(__name__)

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
PAGE = 4096
INLINE_WRITE_MAX = 128 << 10
INLINE_WRITE_SLOW = 0.002  # seconds
INLINE_WRITE_BACKOFF = 0.05  # seconds
# O_DIRECT alignment tried first (logical block size of most devices); an EINVAL
# completion raises it to a page, a second one turns direct reads off.
DIRECT_ALIGN = 512

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.fallocate.restype = ctypes.c_int


def create_sparse_image(path: str, size: int) -> None:
    """Create a sparse image file of ``size`` bytes (ftruncate); never grows an existing one."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    log.info("created sparse image %s of %d bytes", path, size)


class _InlineTimer:
    """Blocking calls made inline on the trio loop, timed: one that took longer than
    INLINE_WRITE_SLOW sends this kind of I/O to worker threads for INLINE_WRITE_BACKOFF
    seconds (plus the time it took), unless a worker-thread round trip costs more than
    the slow call did: then threads would only add to it (a TCG-emulated Xen dom0 on
    tmpfs: a hop of 60-80 ms against inline reads of a few ms when its vCPU is
    descheduled, which turned 300 reads/s into 12)."""

    __slots__ = ("what", "until", "hop")

    def __init__(self, what: str) -> None:
        self.what = what
        self.until = 0.0
        self.hop = 0.0  # what the last calls of this kind cost in a worker thread (EWMA)

    def allowed(self) -> bool:
        return time.perf_counter() >= self.until

    def call(self, fn: Callable[..., int], *args: object) -> int:
        now = time.perf_counter()
        result = fn(*args)
        took = time.perf_counter() - now
        if took > INLINE_WRITE_SLOW and took > self.hop:
            self.until = now + took + INLINE_WRITE_BACKOFF
            log.debug("inline %s took %.0f us: threads for a while", self.what, took * 1e6)
        return result

    async def in_thread(self, fn: Callable[..., object], *args: object) -> None:
        """``fn(*args)`` in a worker thread, its round trip remembered."""
        now = time.perf_counter()
        await trio.to_thread.run_sync(fn, *args)
        took = time.perf_counter() - now
        self.hop = took if not self.hop else 0.75 * self.hop + 0.25 * took


class Backing:
    """One open raw image file or block device."""

    def __init__(self, path: str, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self.fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        self.is_block_device = stat.S_ISBLK(os.fstat(self.fd).st_mode)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.nowait_reads = RWF_NOWAIT != 0
        # Set when the file refuses RWF_NOWAIT reads (EOPNOTSUPP): reads are then tried
        # inline anyway, timed (see _read_inline_timed).
        self.timed_inline_reads = False
        self.nowait_writes = RWF_NOWAIT != 0
        self.inline_writes = not self.is_block_device
        self._write_timer = _InlineTimer("write")
        self._read_timer = _InlineTimer("read")
        self.closed = False
        self.direct_align = DIRECT_ALIGN
        self.direct_fd: int | None = self._open_direct()

    def _open_direct(self) -> int | None:
        """A second, O_DIRECT descriptor of the same inode (through procfs; by path if
        /proc is not mounted, checked to be the same file), or None where refused."""
        flags = os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC
        why = ""
        for name in (f"/proc/self/fd/{self.fd}", self.path):
            try:
                fd = os.open(name, flags)
            except OSError as e:
                why = why or e.strerror or str(e)
                if e.errno == errno.EINVAL:
                    break  # O_DIRECT itself refused (tmpfs before Linux 6.6)
                continue
            st, mine = os.fstat(fd), os.fstat(self.fd)
            if (st.st_dev, st.st_ino, st.st_rdev) == (mine.st_dev, mine.st_ino, mine.st_rdev):
                log.info("%s: page-cache hits read inline, misses with Linux AIO (O_DIRECT)",
                         self.path)
                return fd
            os.close(fd)
            why = "the path now names another file"
        log.info("%s: page-cache hits read inline, misses in worker threads (no O_DIRECT: %s)",
                 self.path, why)
        return None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)
            if self.direct_fd is not None:
                # A read still in flight holds its own reference to the file.
                os.close(self.direct_fd)
                self.direct_fd = None

    def refresh_size(self) -> int:
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        return self.size

    # -- reads ---------------------------------------------------------------------

    def _preadv_all(self, views: Sequence[memoryview], offset: int, flags: int) -> int:
        """preadv until ``views`` are full or EOF (zero-filled past EOF). With RWF_NOWAIT
        returns early (count so far) on EAGAIN or a short read."""
        total = sum(len(v) for v in views)
        done = 0
        while done < total:
            rest = skip(views, done)[:IOV_MAX]
            try:
                n = os.preadv(self.fd, rest, offset + done, flags) if flags else os.preadv(
                    self.fd, rest, offset + done
                )
            except BlockingIOError:
                return done
            except OSError as e:
                if flags and e.errno == errno.EOPNOTSUPP:
                    self.nowait_reads = False
                    self.timed_inline_reads = not self.is_block_device
                    return done
                raise
            if n == 0:
                if flags:
                    return done  # may be a NOWAIT artefact: let the blocking path decide
                zero(skip(views, done))  # past EOF of a file shorter than its capacity
                return total
            done += n
            if flags and n < sum(len(v) for v in rest):
                return done  # partially cached: finish in a thread
        return done

    def read_inline(self, offset: int, views: Sequence[memoryview], nbytes: int = -1) -> bool:
        """Try the whole read without blocking (RWF_NOWAIT); False when it must go to a
        thread (the caller then reads everything again through read_into). ``nbytes``:
        the length of ``views`` when the caller knows it."""
        if not self.nowait_reads:
            return self.timed_inline_reads and self._read_inline_timed(offset, views)
        if len(views) > IOV_MAX:
            try:
                return self._preadv_all(views, offset, RWF_NOWAIT) == sum(len(v) for v in views)
            except OSError:
                return False  # the blocking path reports it
        # The usual case: one preadv; a short (partly cached) read goes to a thread too.
        try:
            n = os.preadv(self.fd, views, offset, RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP:
                self.nowait_reads = False
                self.timed_inline_reads = not self.is_block_device
            return False  # the blocking path reports it
        return n == (nbytes if nbytes >= 0 else sum(map(len, views)))

    def _read_inline_timed(self, offset: int, views: Sequence[memoryview]) -> bool:
        """No RWF_NOWAIT for reads on this file (tmpfs before Linux 6.6 answers EOPNOTSUPP):
        read inline anyway, timed like inline writes; a slow one sends reads to threads for
        a while. A worker-thread hop costs ~60-80 ms in a PV dom0 under TCG."""
        if self.is_block_device or len(views) > IOV_MAX or not self._read_timer.allowed():
            return False
        try:
            n = self._read_timer.call(os.preadv, self.fd, views, offset)
        except OSError:
            return False  # the blocking path reports it
        return n == sum(len(v) for v in views)

    async def read_into(self, offset: int, views: Sequence[memoryview]) -> None:
        """Fill ``views`` from ``offset``: inline on a page-cache hit, else with AIO on the
        O_DIRECT descriptor when aligned, else in a thread."""
        done = 0
        total = sum(len(v) for v in views)
        if self.nowait_reads:
            done = self._preadv_all(views, offset, RWF_NOWAIT)
            if done == total:
                return
        rest = skip(views, done)
        # Neither the direct read nor the thread read is cancellable: the kernel writes
        # into guest memory until it completes (the caller answers ABORTED after it).
        if self.direct_fd is not None and not (offset + done) % self.direct_align:
            done += await self._read_direct(offset + done, rest)
            if done == total:
                return
            rest = skip(views, done)
        await self._read_timer.in_thread(self._preadv_all, rest, offset + done, 0)

    async def _read_direct(self, offset: int, views: Sequence[memoryview]) -> int:
        """Linux AIO on the O_DIRECT descriptor; the bytes read (0: not done, a short
        count at EOF), the caller reads the rest in a thread."""
        assert self.direct_fd is not None
        align = self.direct_align
        try:
            return await aio.preadv(self.direct_fd, views, offset, align)
        except aio.AioFallback:
            return 0
        except OSError as e:
            if e.errno == errno.EINVAL and self.direct_fd is not None:
                # O_DIRECT wants a coarser alignment than tried (logical block size,
                # DMA alignment of the device): try a page, then give up on it.
                if align < PAGE:
                    self.direct_align = max(self.direct_align, PAGE)
                    log.info("%s: O_DIRECT read refused at %d-byte alignment, trying %d",
                             self.path, align, PAGE)
                elif not self.closed:
                    log.info("%s: O_DIRECT reads refused: misses go to worker threads", self.path)
                    os.close(self.direct_fd)
                    self.direct_fd = None
            else:
                log.debug("%s: direct read at %d failed (%s): redone in a thread", self.path,
                          offset, e)
            return 0

    # -- writes --------------------------------------------------------------------

    def _pwritev_all(self, views: Sequence[memoryview], offset: int, flags: int) -> int:
        total = sum(len(v) for v in views)
        done = 0
        while done < total:
            rest = skip(views, done)[:IOV_MAX]
            try:
                n = os.pwritev(self.fd, rest, offset + done, flags) if flags else os.pwritev(
                    self.fd, rest, offset + done
                )
            except BlockingIOError:
                return done
            except OSError as e:
                if flags and e.errno == errno.EOPNOTSUPP:
                    self.nowait_writes = False
                    return done
                raise
            if n == 0:
                if flags:
                    return done
                raise OSError(errno.ENOSPC, "pwritev wrote nothing")
            done += n
        return done

    def _write_inline_count(self, offset: int, views: Sequence[memoryview], total: int) -> int:
        if self.nowait_writes:
            done = self._pwritev_all(views, offset, RWF_NOWAIT)
            if done or self.nowait_writes:
                return done
        if (self.inline_writes and total <= INLINE_WRITE_MAX and not (offset | total) % PAGE
                and self._write_timer.allowed()):
            return self._write_timer.call(self._pwritev_all, views, offset, 0)
        return 0

    def write_inline(self, offset: int, views: Sequence[memoryview], sync: bool) -> bool:
        """Try the whole write without going to a thread; False when write_from must do
        it (rewriting any part already written is harmless: the same data)."""
        if sync:
            return False
        total = sum(len(v) for v in views)
        try:
            return self._write_inline_count(offset, views, total) == total
        except OSError:
            return False  # the thread path reports it

    async def write_from(self, offset: int, views: Sequence[memoryview], sync: bool) -> None:
        """Write ``views`` at ``offset``; returns only after pwritev returned (and after
        fdatasync when ``sync``: WCE=0, FUA, SBC-3 4.13)."""
        total = sum(len(v) for v in views)
        done = 0 if sync else self._write_inline_count(offset, views, total)
        if sync:  # fdatasync's time says nothing about a thread hop
            await trio.to_thread.run_sync(self._write_rest_sync, skip(views, done), offset + done, sync)
        elif done < total:
            await self._write_timer.in_thread(self._write_rest_sync, skip(views, done), offset + done,
                                              sync)

    def _write_rest_sync(self, views: Sequence[memoryview], offset: int, sync: bool) -> None:
        if views:
            self._pwritev_all(views, offset, 0)
        if sync:
            os.fdatasync(self.fd)

    async def flush(self) -> None:
        """SYNCHRONIZE CACHE: fdatasync in a worker thread."""
        await trio.to_thread.run_sync(os.fdatasync, self.fd)

    # -- provisioning ----------------------------------------------------------------

    def _punch_sync(self, offset: int, length: int) -> None:
        """Deallocate so that the range reads back as zeros (LBPRZ=1).

        fallocate PUNCH_HOLE|KEEP_SIZE (files; on a block device the kernel zeroes by
        unmapping when the device guarantees zeros). Where that is refused, ZERO_RANGE
        (a block device then writes zeros if it must), and last, plain zero writes.
        BLKDISCARD is not used: a discarded range need not read back as zeros.
        """
        for mode in (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                     FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):
            if _libc.fallocate(self.fd, mode, offset, length) == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV):
                raise OSError(err, os.strerror(err))
        zeros = memoryview(bytes(min(length, 1 << 20)))
        done = 0
        while done < length:
            n = min(len(zeros), length - done)
            self._pwritev_all([zeros[:n]], offset + done, 0)
            done += n

    async def punch_hole(self, offset: int, length: int) -> None:
        """Deallocate a range (UNMAP, WRITE SAME with UNMAP): reads return zeros after it."""
        if length > 0:
            await trio.to_thread.run_sync(self._punch_sync, offset, length)

    def mapped_extent(self, offset: int) -> tuple[bool, int]:
        """(mapped, length) of the extent starting at ``offset``, from SEEK_DATA/SEEK_HOLE.

        Block devices (and filesystems without SEEK_HOLE) report everything as mapped.
        """
        if offset >= self.size:
            return True, 0
        if self.is_block_device:
            return True, self.size - offset
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after offset: a hole to the end
                return False, self.size - offset
            return True, self.size - offset
        if data > offset:
            return False, min(data, self.size) - offset
        hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        return True, min(hole, self.size) - offset


def write_pattern_sync(backing: Backing, offset: int, block: bytes, nblocks: int) -> None:
    """WRITE SAME without UNMAP: ``block`` repeated ``nblocks`` times (worker thread)."""
    reps = max(1, min(nblocks, (1 << 20) // len(block)))
    chunk = memoryview(block * reps)
    done = 0
    while done < nblocks:
        n = min(reps, nblocks - done)
        backing._pwritev_all([chunk[: n * len(block)]], offset + done * len(block), 0)
        done += n
