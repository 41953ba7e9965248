"""How a request's granted data pages become buffers: the grant strategy.

- ``MapPerRequest``: all data grants of a request mapped in one gntdev ioctl +
  one mmap, read-only for TO_DEVICE; the target reads/writes guest pages in
  place; unmapped before the response is pushed (xen-scsifront ends foreign
  access right after the response, and a grant still mapped then disables the
  whole host, so mappings can never outlive a request: no persistent grants).
- ``GrantCopy``: one IOCTL_GNTDEV_GRANT_COPY into local buffers before the
  command (TO_DEVICE) or from them after it (FROM_DEVICE).
- ``BySize`` (``auto``, the default): ``copy`` for requests under COPY_BELOW bytes,
  ``map`` for larger ones. Measured in a TCG Xen dom0 (images/xen/bench_backends.py,
  two boots): copy leads by 1.3-1.9x on 4 KiB requests (no page-table change per
  request), map by 1.9x on 128 KiB reads (no bounce copy of the data).

Both also read SG_GRANT indirect segment pages (always read-only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from bridge.xen.platform import PAGE_SIZE, GrantCopySegment, GrantMapping, GrantOps
from bridge.xen.vscsiif import Segment


class RequestBuffers(Protocol):
    views: list[memoryview]

    def finish(self) -> None:
        """Copy back if needed and release everything; raises GrantError if copy-out failed."""


class DataPath(Protocol):
    name: str

    def acquire(self, domid: int, segs: Sequence[Segment], writable: bool) -> RequestBuffers: ...

    def read_pages(self, domid: int, segs: Sequence[Segment]) -> list[bytes]:
        """The bytes [offset, offset+length) of each (read-only) granted page."""

    def copy_out_together(self, bufs: Sequence[RequestBuffers]) -> None:
        """Before their ``finish``: do in one operation what finishing these buffers must
        send to the guest (nothing for mappings). Raises GrantError with nothing
        marked done: each ``finish`` then does its own, and only a bad one fails."""


def coalesce(segs: Sequence[Segment]) -> list[tuple[int, int]]:
    """(start, end) byte ranges in a contiguous mapping of the segments' pages (page i at
    i * PAGE_SIZE), adjacent ranges merged: a 508 KiB request of whole pages is one range."""
    ranges: list[tuple[int, int]] = []
    for i, s in enumerate(segs):
        start = i * PAGE_SIZE + s.offset
        end = start + s.length
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    return ranges


class _Mapped:
    def __init__(self, mapping: GrantMapping, segs: Sequence[Segment]) -> None:
        self._mapping = mapping
        view = mapping.view
        if view is not None:
            self.views = [view[a:b] for a, b in coalesce(segs)]
        else:
            pages = mapping.pages
            self.views = [pages[i][s.offset:s.offset + s.length] for i, s in enumerate(segs)]

    def finish(self) -> None:
        for v in self.views:
            v.release()
        self.views = []
        self._mapping.close()


class MapPerRequest:
    name = "map"

    def __init__(self, grants: GrantOps) -> None:
        self.grants = grants

    def acquire(self, domid: int, segs: Sequence[Segment], writable: bool) -> _Mapped:
        mapping = self.grants.map(domid, [s.gref for s in segs], writable)
        return _Mapped(mapping, segs)

    def copy_out_together(self, bufs: Sequence[RequestBuffers]) -> None:
        pass  # the data are in the guest's pages already

    def read_pages(self, domid: int, segs: Sequence[Segment]) -> list[bytes]:
        mapping = self.grants.map(domid, [s.gref for s in segs], False)
        try:
            return [bytes(mapping.pages[i][s.offset:s.offset + s.length])
                    for i, s in enumerate(segs)]
        finally:
            mapping.close()


class _Copied:
    def __init__(self, grants: GrantOps, domid: int, segs: Sequence[Segment], to_guest: bool
                 ) -> None:
        self._grants = grants
        self._domid = domid
        self._segs = segs
        self._to_guest = to_guest
        total = sum(s.length for s in segs)
        self._buf = bytearray(total)
        mv = memoryview(self._buf)
        self._seg_views = []
        pos = 0
        for s in segs:
            self._seg_views.append(mv[pos:pos + s.length])
            pos += s.length
        self.views = [mv] if total else []  # one contiguous buffer for the target

    def _segments(self) -> list[GrantCopySegment]:
        return [GrantCopySegment(self._domid, s.gref, s.offset, v, self._to_guest)
                for s, v in zip(self._segs, self._seg_views, strict=True) if s.length]

    def finish(self) -> None:
        try:
            if self._to_guest:
                self._grants.copy(self._segments())
        finally:
            for v in self._seg_views:
                v.release()
            for v in self.views:
                v.release()
            self._seg_views = []
            self.views = []


class GrantCopy:
    name = "copy"

    def __init__(self, grants: GrantOps) -> None:
        self.grants = grants

    def acquire(self, domid: int, segs: Sequence[Segment], writable: bool) -> _Copied:
        bufs = _Copied(self.grants, domid, segs, to_guest=writable)
        if not writable:
            try:
                self.grants.copy(bufs._segments())
            except BaseException:
                bufs._to_guest = False
                bufs.finish()
                raise
        return bufs

    def copy_out_together(self, bufs: Sequence[RequestBuffers]) -> None:
        """One GNTTABOP_copy for the data-in of every request answered in one pass over
        the ring (instead of one per request)."""
        copies = [b for b in bufs if isinstance(b, _Copied) and b._to_guest]
        if len(copies) < 2:
            return  # one request: its own finish copies
        self.grants.copy([seg for b in copies for seg in b._segments()])
        for b in copies:
            b._to_guest = False  # copied: finish only releases

    def read_pages(self, domid: int, segs: Sequence[Segment]) -> list[bytes]:
        out = [bytearray(s.length) for s in segs]
        self.grants.copy([GrantCopySegment(domid, s.gref, s.offset, memoryview(b), False)
                          for s, b in zip(segs, out, strict=True)])
        return [bytes(b) for b in out]


# Requests smaller than this are copied, larger ones mapped: between the sizes measured
# (4 KiB: copy better; 128 KiB: map better for reads, equal for writes).
COPY_BELOW = 32 * 1024


class BySize:
    name = "auto"

    def __init__(self, grants: GrantOps, copy_below: int = COPY_BELOW) -> None:
        self.copy_below = copy_below
        self._copy = GrantCopy(grants)
        self._map = MapPerRequest(grants)

    def acquire(self, domid: int, segs: Sequence[Segment], writable: bool) -> RequestBuffers:
        small = sum(s.length for s in segs) < self.copy_below
        return (self._copy if small else self._map).acquire(domid, segs, writable)

    def copy_out_together(self, bufs: Sequence[RequestBuffers]) -> None:
        self._copy.copy_out_together(bufs)  # the copied ones; mapped ones need nothing

    def read_pages(self, domid: int, segs: Sequence[Segment]) -> list[bytes]:
        return self._copy.read_pages(domid, segs)  # indirect pages: a few, read once


DATA_PATHS: dict[str, Callable[[GrantOps], DataPath]] = {
    "auto": BySize, "map": MapPerRequest, "copy": GrantCopy}


def make_datapath(name: str, grants: GrantOps) -> DataPath:
    cls = DATA_PATHS.get(name)
    if cls is None:
        raise ValueError(f"unknown grant strategy {name!r} ({', '.join(DATA_PATHS)})")
    return cls(grants)


assert PAGE_SIZE == 4096
