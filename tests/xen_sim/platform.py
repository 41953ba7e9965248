"""A simulated Xen platform: guest memory, grant table and event channels in-process.

Guest RAM of each simulated domain is a memfd; a grant names one of its
pages. Mapping a grant mmaps that page of the memfd (read-only when asked),
so backend views alias guest memory exactly like gntdev mappings do, writes
through a read-only mapping fail, and unmapping while a view is alive raises
BufferError as a real mmap would. Every operation is counted, which is how
the grant strategies are compared.
"""

from __future__ import annotations

import mmap
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from bridge.xen.platform import PAGE_SIZE, GrantCopySegment, GrantError, XenPlatform


@dataclass
class _Grant:
    domid: int  # granting domain
    to_domid: int
    page: int  # page number in the granting domain's memory
    readonly: bool
    mapped: int = 0


class SimGuestMemory:
    """A domain's RAM: ``pages`` pages of a memfd, viewed by the guest through ``view``."""

    def __init__(self, domid: int, pages: int = 4096) -> None:
        self.domid = domid
        self.pages = pages
        self.fd = os.memfd_create(f"sim-dom{domid}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, pages * PAGE_SIZE)
        self._mm = mmap.mmap(self.fd, pages * PAGE_SIZE, flags=mmap.MAP_SHARED)
        self.view = memoryview(self._mm)
        self._free = list(range(pages - 1, -1, -1))

    def alloc_page(self) -> int:
        if not self._free:
            raise MemoryError("simulated guest out of pages")
        return self._free.pop()

    def free_page(self, page: int) -> None:
        self._free.append(page)

    def page(self, page: int) -> memoryview:
        return self.view[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]


class SimGrantTable:
    """The hypervisor's grant tables of all simulated domains."""

    def __init__(self) -> None:
        self.memory: dict[int, SimGuestMemory] = {}
        self._grants: dict[tuple[int, int], _Grant] = {}
        self._next_ref: dict[int, int] = {}

    def add_domain(self, domid: int, pages: int = 4096) -> SimGuestMemory:
        mem = SimGuestMemory(domid, pages)
        self.memory[domid] = mem
        self._next_ref[domid] = 8  # Linux reserves the first grant entries
        return mem

    def grant(self, domid: int, to_domid: int, page: int, readonly: bool = False) -> int:
        """gnttab_grant_foreign_access: returns the grant reference."""
        ref = self._next_ref[domid]
        self._next_ref[domid] = ref + 1
        self._grants[(domid, ref)] = _Grant(domid, to_domid, page, readonly)
        return ref

    def end_access(self, domid: int, ref: int) -> bool:
        """gnttab_end_foreign_access_ref: False (grant kept) while the backend still maps it."""
        g = self._grants.get((domid, ref))
        if g is None:
            return True
        if g.mapped:
            return False
        del self._grants[(domid, ref)]
        return True

    def mapped_count(self) -> int:
        return sum(g.mapped for g in self._grants.values())

    def lookup(self, by_domid: int, domid: int, ref: int, writable: bool) -> _Grant:
        g = self._grants.get((domid, ref))
        if g is None or g.to_domid != by_domid:
            raise GrantError(f"dom{domid} gref {ref}: GNTST_bad_gntref")
        if writable and g.readonly:
            raise GrantError(f"dom{domid} gref {ref}: GNTST_permission_denied (read-only grant)")
        return g


class SimMapping:
    def __init__(self, grants: list[_Grant], mms: list[mmap.mmap], ops: Counter) -> None:
        self._grants = grants
        self._mms = mms
        self._ops = ops
        self.pages = [memoryview(mm) for mm in mms]
        self.view: memoryview | None = None

    def close(self) -> None:
        if not self._mms:
            return
        for p in self.pages:
            p.release()
        for mm in self._mms:
            mm.close()  # BufferError if a view is still alive, as with gntdev
        for g in self._grants:
            g.mapped -= 1
        self._mms = []
        self.pages = []
        self._ops["unmap_ioctl"] += 1


class SimGrants:
    """GrantOps for the backend domain, counting operations."""

    def __init__(self, table: SimGrantTable, backend_domid: int = 0) -> None:
        self.table = table
        self.domid = backend_domid
        self.ops: Counter[str] = Counter()
        self.fail_refs: set[int] = set()  # refs that fail to map, for hostile tests

    def map(self, domid: int, refs: Sequence[int], writable: bool) -> SimMapping:
        self.ops["map_ioctl"] += 1
        self.ops["mmap"] += 1
        self.ops["pages_mapped"] += len(refs)
        if not refs:
            raise GrantError("empty grant batch")
        grants = []
        for r in refs:
            if r in self.fail_refs:
                raise GrantError(f"dom{domid} gref {r}: GNTST_general_error")
            grants.append(self.table.lookup(self.domid, domid, r, writable))
        mem = self.table.memory[domid]
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mms = [mmap.mmap(mem.fd, PAGE_SIZE, flags=mmap.MAP_SHARED, prot=prot,
                         offset=g.page * PAGE_SIZE) for g in grants]
        for g in grants:
            g.mapped += 1
        return SimMapping(grants, mms, self.ops)

    def copy(self, segments: Sequence[GrantCopySegment]) -> None:
        self.ops["copy_ioctl"] += 1
        self.ops["copy_segments"] += len(segments)
        for seg in segments:
            if seg.offset + len(seg.local) > PAGE_SIZE:
                raise GrantError("grant copy crosses a page")
            if seg.gref in self.fail_refs:
                raise GrantError(f"dom{seg.domid} gref {seg.gref}: GNTST_general_error")
            g = self.table.lookup(self.domid, seg.domid, seg.gref, seg.to_guest)
            page = self.table.memory[seg.domid].page(g.page)
            n = len(seg.local)
            if seg.to_guest:
                page[seg.offset:seg.offset + n] = seg.local
            else:
                seg.local[:] = page[seg.offset:seg.offset + n]
            self.ops["bytes_copied"] += n

    def close(self) -> None:
        pass


class SimEventChannel:
    def __init__(self, hub: SimEventChannels, domid: int, port: int) -> None:
        self._hub = hub
        self.domid = domid
        self.port = port
        self.peer: SimEventChannel | None = None
        self._pending = False
        self._event = trio.Event()
        self.notifies_sent = 0
        self.closed = False
        self.raised_at_bind = False

    def _raise(self) -> None:
        self._pending = True
        self._event.set()

    async def wait(self) -> None:
        while not self._pending:
            await self._event.wait()
            self._event = trio.Event()
        self._pending = False

    def notify(self) -> None:
        self.notifies_sent += 1
        self._hub.notifies += 1
        if self.peer is not None and not self.peer.closed:
            self.peer._raise()

    def close(self) -> None:
        self.closed = True
        self._hub._ports.pop((self.domid, self.port), None)


class SimEventChannels:
    """Event channels of all simulated domains."""

    def __init__(self) -> None:
        self._ports: dict[tuple[int, int], SimEventChannel] = {}
        self._next: dict[int, int] = {}
        self.notifies = 0

    def _new(self, domid: int) -> SimEventChannel:
        port = self._next.get(domid, 1)
        self._next[domid] = port + 1
        ch = SimEventChannel(self, domid, port)
        self._ports[(domid, port)] = ch
        return ch

    def alloc_unbound(self, domid: int, remote_domid: int) -> SimEventChannel:
        ch = self._new(domid)
        ch.remote_domid = remote_domid  # type: ignore[attr-defined]
        return ch

    def binder(self, domid: int) -> SimBinder:
        return SimBinder(self, domid)


class SimBinder:
    """EventChannels as seen from one domain (the backend's)."""

    def __init__(self, hub: SimEventChannels, domid: int) -> None:
        self.hub = hub
        self.domid = domid

    def bind_interdomain(self, domid: int, remote_port: int) -> SimEventChannel:
        remote = self.hub._ports.get((domid, remote_port))
        if remote is None or remote.peer is not None or \
                getattr(remote, "remote_domid", None) != self.domid:
            raise OSError(22, f"cannot bind dom{domid} port {remote_port}")
        local = self.hub._new(self.domid)
        local.peer, remote.peer = remote, local
        # Xen's evtchn_bind_interdomain sets the new local port pending (notifications the
        # remote sent to its unbound port were dropped): the first wait returns at once.
        local.raised_at_bind = True
        local._raise()
        return local


class SimXen:
    """One simulated machine: grant table, event channels and the backend's platform."""

    def __init__(self, backend_domid: int = 0) -> None:
        self.grant_table = SimGrantTable()
        self.evtchn = SimEventChannels()
        self.grants = SimGrants(self.grant_table, backend_domid)
        self.platform = XenPlatform(self.grants, self.evtchn.binder(backend_domid), backend_domid)
