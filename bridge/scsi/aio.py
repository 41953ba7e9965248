"""Linux native AIO for O_DIRECT reads: io_submit, completions signalled on an eventfd.

The kernel ABI is linux/aio_abi.h (struct iocb, struct io_event, IOCB_CMD_PREADV,
IOCB_FLAG_RESFD) and fs/aio.c; the system calls are made through libc's syscall() with
the x86_64 numbers (glibc has no wrappers for them). Each completion increments the
eventfd (IOCB_FLAG_RESFD); one reaper task per trio run waits for it to become readable
and collects the events with io_getevents. The read's buffers are guest memory, so a
submitted read is never abandoned: the waiting task cannot be cancelled until its
completion arrived, and io_destroy (at the end of the run) waits for any read still in
the kernel before the context goes away.

    n = await preadv(fd, views, offset, align=512)   # raises AioFallback: use threads
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import platform
from collections.abc import Sequence

import outcome
import trio

log = logging.getLogger(__name__)

# x86_64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl).
SYS_IO_SETUP = 206
SYS_IO_DESTROY = 207
SYS_IO_GETEVENTS = 208
SYS_IO_SUBMIT = 209
IOCB_CMD_PREADV = 7
IOCB_FLAG_RESFD = 1 << 0
MAX_IN_FLIGHT = 128
IOV_MAX = 1024  # UIO_MAXIOV: the kernel's limit on one PREADV's segments

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class Iocb(ctypes.Structure):
    """struct iocb (linux/aio_abi.h), little-endian field order: 64 bytes."""

    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class IoEvent(ctypes.Structure):
    """struct io_event (linux/aio_abi.h): res is the byte count or -errno."""

    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


class Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


assert ctypes.sizeof(Iocb) == 64 and ctypes.sizeof(IoEvent) == 32


class AioFallback(Exception):
    """The read was not submitted: do it another way (worker thread)."""


class AioUnavailable(AioFallback):
    """No AIO context in this run (io_setup refused, not x86_64), or it is full."""


class AioUnsuitable(AioFallback):
    """A buffer is read-only, or an address, length or the offset is not aligned."""


def _check(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


class _InFlight:
    """What must stay alive until the kernel completed the read."""

    __slots__ = ("task", "iocb", "iov", "keep")

    def __init__(self, task: trio.lowlevel.Task, iocb: Iocb, iov: ctypes.Array, keep: list) -> None:
        self.task = task
        self.iocb = iocb
        self.iov = iov
        self.keep = keep


class AioContext:
    """One io_setup context and its eventfd; reaped by one trio system task."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        ctx = ctypes.c_ulong(0)
        _check(_syscall(ctypes.c_long(SYS_IO_SETUP), ctypes.c_uint(depth), ctypes.byref(ctx)))
        self._ctx = ctx.value
        try:
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            _syscall(ctypes.c_long(SYS_IO_DESTROY), ctypes.c_ulong(self._ctx))
            raise
        self._events = (IoEvent * depth)()
        self._no_wait = Timespec(0, 0)
        self._in_flight: dict[int, _InFlight] = {}
        self._next_key = 0
        self.closed = False

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def preadv(self, fd: int, views: Sequence[memoryview], offset: int, align: int = 1) -> int:
        if self.closed or len(self._in_flight) >= self.depth:
            raise AioUnavailable("AIO context full or closed")
        if offset % align:
            raise AioUnsuitable("offset not aligned")
        views = [v for v in views if v.nbytes]
        if not views:
            return 0
        if len(views) > IOV_MAX:
            raise AioUnsuitable("more buffers than IOV_MAX")
        iov = (Iovec * len(views))()
        keep = []
        for i, v in enumerate(views):
            if v.readonly or v.nbytes % align:
                raise AioUnsuitable("read-only or unaligned buffer")
            try:
                c = ctypes.c_char.from_buffer(v)  # holds the buffer export until the completion
            except (TypeError, ValueError, BufferError) as e:
                raise AioUnsuitable(str(e)) from None
            addr = ctypes.addressof(c)
            if addr % align:
                raise AioUnsuitable("buffer address not aligned")
            keep.append(c)
            iov[i].iov_base = addr
            iov[i].iov_len = v.nbytes
        key = self._next_key = (self._next_key + 1) & 0xFFFF_FFFF_FFFF_FFFF
        iocb = Iocb(aio_data=key, aio_lio_opcode=IOCB_CMD_PREADV, aio_fildes=fd,
                    aio_buf=ctypes.addressof(iov), aio_nbytes=len(views), aio_offset=offset,
                    aio_flags=IOCB_FLAG_RESFD, aio_resfd=self._efd)
        iocbpp = (ctypes.c_void_p * 1)(ctypes.addressof(iocb))
        ret = _syscall(ctypes.c_long(SYS_IO_SUBMIT), ctypes.c_ulong(self._ctx), ctypes.c_long(1),
                       iocbpp)
        if ret != 1:
            # Not submitted (EAGAIN: no room in the ring, ENOMEM, EBADF ...); the errors of
            # the read itself (O_DIRECT's EINVAL) come back as its completion.
            err = ctypes.get_errno() if ret < 0 else errno.EAGAIN
            raise AioUnavailable(f"io_submit: {os.strerror(err)}")
        self._in_flight[key] = _InFlight(trio.lowlevel.current_task(), iocb, iov, keep)
        # Not cancellable: the kernel writes into the buffers until the completion.
        res = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        if res < 0:
            raise OSError(-res, os.strerror(-res))
        return res

    def _collect(self) -> None:
        """Hand every completed event to its waiting task (io_getevents, no waiting)."""
        while self._in_flight:
            n = _syscall(ctypes.c_long(SYS_IO_GETEVENTS), ctypes.c_ulong(self._ctx),
                         ctypes.c_long(0), ctypes.c_long(self.depth), self._events,
                         ctypes.byref(self._no_wait))
            if n < 0:
                if ctypes.get_errno() == errno.EINTR:
                    continue
                _check(n)
            for i in range(n):
                ev = self._events[i]
                entry = self._in_flight.pop(ev.data, None)
                if entry is None:
                    log.error("AIO completion for an unknown request %d", ev.data)
                    continue
                trio.lowlevel.reschedule(entry.task, outcome.Value(ev.res))
            if n < self.depth:
                return

    async def reap(self) -> None:
        """The reaper: runs as a system task for the whole trio run, then closes."""
        try:
            while True:
                await trio.lowlevel.wait_readable(self._efd)
                try:
                    os.eventfd_read(self._efd)
                    self._collect()
                except BlockingIOError:
                    continue
                except OSError as e:  # not expected; keep the run alive
                    log.error("AIO reaper: %s", e)
        finally:
            self.close()

    def close(self) -> None:
        """io_destroy waits for the reads still in the kernel (fs/aio.c), then the eventfd goes."""
        if self.closed:
            return
        self.closed = True
        if self._in_flight:
            log.warning("closing the AIO context with %d reads in flight", len(self._in_flight))
        _syscall(ctypes.c_long(SYS_IO_DESTROY), ctypes.c_ulong(self._ctx))
        self._in_flight.clear()
        try:
            trio.lowlevel.notify_closing(self._efd)
        except RuntimeError:
            pass  # outside a trio run
        os.close(self._efd)


_CONTEXT: trio.lowlevel.RunVar[AioContext | None] = trio.lowlevel.RunVar("bridge_aio_context")
_warned = False


def current_context() -> AioContext | None:
    """This trio run's AIO context, made (with its reaper) on first use; None when the
    kernel refuses one (io_setup EAGAIN: fs.aio-max-nr reached; ENOSYS) or not x86_64."""
    global _warned
    try:
        return _CONTEXT.get()
    except LookupError:
        pass
    ctx: AioContext | None = None
    if platform.machine() == "x86_64":
        try:
            ctx = AioContext(MAX_IN_FLIGHT)
        except OSError as e:
            if not _warned:
                log.warning("Linux AIO unavailable (%s): cache misses go to worker threads", e)
                _warned = True
    _CONTEXT.set(ctx)
    if ctx is not None:
        trio.lowlevel.spawn_system_task(ctx.reap, name="bridge.scsi.aio reaper")
    return ctx


async def preadv(fd: int, views: Sequence[memoryview], offset: int, align: int = 1) -> int:
    """Read into ``views`` at ``offset`` with one IOCB_CMD_PREADV; returns the bytes read
    (short at EOF). Raises AioFallback when it was not submitted (no context, full,
    unsuitable buffers) and OSError for a failed read (O_DIRECT says EINVAL when the
    alignment is wrong for the device)."""
    ctx = current_context()
    if ctx is None:
        raise AioUnavailable("no AIO context")
    return await ctx.preadv(fd, views, offset, align)
