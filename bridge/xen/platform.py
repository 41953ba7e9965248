"""What the backend needs from the machine: grant mapping/copy and event channels.

Two implementations: ``linux_platform`` (/dev/xen/gntdev, /dev/xen/evtchn in a
dom0) and ``tests/xen_sim/platform.py`` (in-process grant table and event channels for
tests). The backend only sees these protocols.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

PAGE_SIZE = 4096


class GrantError(Exception):
    """A grant reference the guest offered could not be mapped or copied."""


class GrantMapping(Protocol):
    """A batch of foreign pages mapped together; ``pages[i]`` is a PAGE_SIZE view of refs[i]."""

    pages: list[memoryview]
    # The whole batch as one contiguous view (pages in refs order), or None when the
    # mapping is not contiguous (the simulated one).
    view: memoryview | None

    def close(self) -> None:
        """Unmap. Every view derived from ``pages`` must have been released."""


@dataclass
class GrantCopySegment:
    """One GNTTABOP_copy between a foreign page and a local buffer (gntdev.h grant_copy_segment)."""

    domid: int
    gref: int
    offset: int  # within the foreign page
    local: memoryview  # len <= PAGE_SIZE - offset
    to_guest: bool  # True: local -> guest page (data-in); False: guest page -> local


class GrantOps(Protocol):
    def map(self, domid: int, refs: Sequence[int], writable: bool) -> GrantMapping:
        """Map all refs of one domain in one operation (all or nothing; GrantError)."""

    def copy(self, segments: Sequence[GrantCopySegment]) -> None:
        """GRANT_COPY all segments in one operation; GrantError if any failed."""

    def close(self) -> None: ...


class EventChannel(Protocol):
    port: int

    async def wait(self) -> None:
        """Wait for (at least) one notification from the other end, and unmask the port."""

    def notify(self) -> None: ...

    def close(self) -> None: ...


class EventChannels(Protocol):
    def bind_interdomain(self, domid: int, remote_port: int) -> EventChannel: ...


@dataclass
class XenPlatform:
    """The bundle the runner hands to each backend."""

    grants: GrantOps
    evtchn: EventChannels
    backend_domid: int = 0
