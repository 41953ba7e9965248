"""Write gate of a logical unit: COMPARE AND WRITE runs alone among writers (SBC-3 5.2).

Ordinary reads and writes (READ, WRITE, WRITE SAME, UNMAP, ...) enter shared; COMPARE
AND WRITE, ORWRITE and WRITE ATOMIC enter exclusive, so their read-modify-write (or
atomic write, SBC-4 4.29) is not interleaved with another command's access. Writers
arriving while an exclusive holder waits queue behind it (no starvation).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class IoGate:
    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def shared_free(self) -> bool:
        """True when a writer may proceed right now without waiting (the synchronous
        fast path, which holds the gate only while it does not yield)."""
        return not self._exclusive and not self._waiting_exclusive

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        while self._exclusive or self._waiting_exclusive:
            await self._changed.wait()
        self._shared += 1
        try:
            yield
        finally:
            self._shared -= 1
            if self._shared == 0:
                self._notify()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        self._waiting_exclusive += 1
        try:
            while self._exclusive or self._shared:
                await self._changed.wait()
        finally:
            self._waiting_exclusive -= 1
            self._notify()  # wake shared waiters if we were cancelled while queued
        self._exclusive = True
        try:
            yield
        finally:
            self._exclusive = False
            self._notify()
