"""The real platform in a Linux dom0: /dev/xen/gntdev and /dev/xen/evtchn.

ioctl numbers and layouts from include/uapi/xen/gntdev.h and evtchn.h (checked
against Debian's headers by tests/xen_abi). Grant batches are mapped with one
IOCTL_GNTDEV_MAP_GRANT_REF and one mmap of count pages at the returned index;
a mapping without PROT_WRITE makes gntdev map the grants read-only
(GNTMAP_readonly), which is what data the guest sends gets.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import struct
from collections.abc import Sequence

import trio

from bridge.xen.platform import PAGE_SIZE, GrantCopySegment, GrantError, XenPlatform

log = logging.getLogger(__name__)

GNTDEV_PATH = "/dev/xen/gntdev"
EVTCHN_PATH = "/dev/xen/evtchn"


def _ioc_none(kind: str, nr: int, size: int) -> int:
    """_IOC(_IOC_NONE, kind, nr, size) on x86/arm (dir bits 30-31 = 0, size bits 16-29)."""
    return (size << 16) | (ord(kind) << 8) | nr


MAP_GRANT_REF = struct.Struct("<IIQ")  # count, pad, index; then refs[] of (domid, ref)
GRANT_REF = struct.Struct("<II")
UNMAP_GRANT_REF = struct.Struct("<QII")  # index, count, pad
IOCTL_GNTDEV_MAP_GRANT_REF = _ioc_none("G", 0, MAP_GRANT_REF.size + GRANT_REF.size)  # 0x184700
IOCTL_GNTDEV_UNMAP_GRANT_REF = _ioc_none("G", 1, UNMAP_GRANT_REF.size)  # 0x104701
IOCTL_GNTDEV_SET_MAX_GRANTS = _ioc_none("G", 3, 4)
IOCTL_GNTDEV_GRANT_COPY = _ioc_none("G", 8, 16)  # {unsigned count; segments*}
GNTCOPY_SOURCE_GREF = 1 << 0
GNTCOPY_DEST_GREF = 1 << 1
GNTST_OKAY = 0

IOCTL_EVTCHN_BIND_INTERDOMAIN = _ioc_none("E", 1, 8)  # 0x84501
IOCTL_EVTCHN_UNBIND = _ioc_none("E", 3, 4)
IOCTL_EVTCHN_NOTIFY = _ioc_none("E", 4, 4)  # 0x44504


class _Foreign(ctypes.Structure):
    _fields_ = [("ref", ctypes.c_uint32), ("offset", ctypes.c_uint16), ("domid", ctypes.c_uint16)]


class _Ptr(ctypes.Union):
    _fields_ = [("virt", ctypes.c_void_p), ("foreign", _Foreign)]


class GrantCopySegmentC(ctypes.Structure):
    """struct ioctl_gntdev_grant_copy_segment (24 bytes on LP64)."""

    _fields_ = [("source", _Ptr), ("dest", _Ptr), ("len", ctypes.c_uint16),
                ("flags", ctypes.c_uint16), ("status", ctypes.c_int16)]


class GrantCopyC(ctypes.Structure):
    _fields_ = [("count", ctypes.c_uint), ("segments", ctypes.POINTER(GrantCopySegmentC))]


class GntdevMapping:
    def __init__(self, dev: GntdevGrants, index: int, count: int, mm: mmap.mmap) -> None:
        self._dev = dev
        self._index = index
        self._count = count
        self._mm: mmap.mmap | None = mm
        self.view: memoryview | None = memoryview(mm)
        self._pages: list[memoryview] | None = None

    @property
    def pages(self) -> list[memoryview]:
        if self._pages is None:
            assert self.view is not None
            self._pages = [self.view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
                           for i in range(self._count)]
        return self._pages

    def close(self) -> None:
        if self._mm is None:
            return
        for page in self._pages or ():
            page.release()
        if self.view is not None:
            self.view.release()
        # BufferError here means a view of the guest pages is still alive: the
        # mapping must stay (unmapping under it would crash); the caller may retry.
        self._mm.close()
        self._mm = None
        self._dev._unmap(self._index, self._count)


class GntdevGrants:
    """GrantOps over /dev/xen/gntdev."""

    def __init__(self, path: str = GNTDEV_PATH, max_grants: int | None = None) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        if max_grants is not None:
            fcntl.ioctl(self.fd, IOCTL_GNTDEV_SET_MAX_GRANTS,
                        bytearray(struct.pack("<I", max_grants)), True)

    def map(self, domid: int, refs: Sequence[int], writable: bool) -> GntdevMapping:
        count = len(refs)
        if count == 0:
            raise GrantError("empty grant batch")
        pairs = [0] * (2 * count)
        pairs[0::2] = [domid] * count
        pairs[1::2] = [r & 0xFFFFFFFF for r in refs]
        arg = bytearray(struct.pack(f"<IIQ{2 * count}I", count, 0, 0, *pairs))
        try:
            fcntl.ioctl(self.fd, IOCTL_GNTDEV_MAP_GRANT_REF, arg, True)
        except OSError as exc:
            raise GrantError(f"IOCTL_GNTDEV_MAP_GRANT_REF: {exc}") from exc
        index = MAP_GRANT_REF.unpack_from(arg, 0)[2]
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            mm = mmap.mmap(self.fd, count * PAGE_SIZE, flags=mmap.MAP_SHARED, prot=prot,
                           offset=index)
        except OSError as exc:  # a grant of the batch failed to map
            self._unmap(index, count)
            raise GrantError(f"mmap of {count} grants from dom{domid}: {exc}") from exc
        return GntdevMapping(self, index, count, mm)

    def _unmap(self, index: int, count: int) -> None:
        try:
            fcntl.ioctl(self.fd, IOCTL_GNTDEV_UNMAP_GRANT_REF,
                        bytearray(UNMAP_GRANT_REF.pack(index, count, 0)), True)
        except OSError as exc:
            log.error("IOCTL_GNTDEV_UNMAP_GRANT_REF index %#x: %s", index, exc)

    def copy(self, segments: Sequence[GrantCopySegment]) -> None:
        n = len(segments)
        if n == 0:
            return
        arr = (GrantCopySegmentC * n)()
        keep = []
        for i, seg in enumerate(segments):
            if seg.offset + len(seg.local) > PAGE_SIZE:
                raise GrantError("grant copy crosses a page")
            local = (ctypes.c_char * len(seg.local)).from_buffer(seg.local)  # needs writable view
            keep.append(local)
            c = arr[i]
            c.len = len(seg.local)
            if seg.to_guest:
                c.source.virt = ctypes.addressof(local)
                c.dest.foreign.ref, c.dest.foreign.offset, c.dest.foreign.domid = \
                    seg.gref, seg.offset, seg.domid
                c.flags = GNTCOPY_DEST_GREF
            else:
                c.source.foreign.ref, c.source.foreign.offset, c.source.foreign.domid = \
                    seg.gref, seg.offset, seg.domid
                c.dest.virt = ctypes.addressof(local)
                c.flags = GNTCOPY_SOURCE_GREF
        op = GrantCopyC(n, arr)
        try:
            fcntl.ioctl(self.fd, IOCTL_GNTDEV_GRANT_COPY, op, True)
        except OSError as exc:
            raise GrantError(f"IOCTL_GNTDEV_GRANT_COPY: {exc}") from exc
        finally:
            del keep
        bad = [i for i in range(n) if arr[i].status != GNTST_OKAY]
        if bad:
            raise GrantError(f"grant copy failed for {len(bad)} of {n} segments "
                             f"(first status {arr[bad[0]].status})")

    def close(self) -> None:
        os.close(self.fd)


class EvtchnPort:
    """One interdomain binding on its own /dev/xen/evtchn file (its own pending ring)."""

    def __init__(self, fd: int, port: int) -> None:
        self.fd = fd
        self.port = port

    async def wait(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            try:
                data = os.read(self.fd, 4 * 64)
            except BlockingIOError:
                continue
            if data:
                # The driver masks a port when it delivers it; writing it back unmasks.
                os.write(self.fd, data[: len(data) - len(data) % 4])
                return

    def notify(self) -> None:
        fcntl.ioctl(self.fd, IOCTL_EVTCHN_NOTIFY, bytearray(struct.pack("<I", self.port)), True)

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            fcntl.ioctl(self.fd, IOCTL_EVTCHN_UNBIND, bytearray(struct.pack("<I", self.port)), True)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                log.warning("IOCTL_EVTCHN_UNBIND port %d: %s", self.port, exc)
        os.close(self.fd)
        self.fd = -1


class EvtchnDevice:
    """EventChannels over /dev/xen/evtchn."""

    def __init__(self, path: str = EVTCHN_PATH) -> None:
        self.path = path

    def bind_interdomain(self, domid: int, remote_port: int) -> EvtchnPort:
        fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            port = fcntl.ioctl(fd, IOCTL_EVTCHN_BIND_INTERDOMAIN,
                               bytearray(struct.pack("<II", domid, remote_port)), True)
        except OSError:
            os.close(fd)
            raise
        return EvtchnPort(fd, port)


def linux_platform(backend_domid: int = 0) -> XenPlatform:
    return XenPlatform(GntdevGrants(), EvtchnDevice(), backend_domid)
