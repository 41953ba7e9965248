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

    def shared(self) -> _Shared:
        """``async with gate.shared():`` (a plain object, not a generator: it is on every
        READ and WRITE that waits)."""
        return _Shared(self)

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


class _Shared:
    __slots__ = ("_gate",)

    def __init__(self, gate: IoGate) -> None:
        self._gate = gate

    async def __aenter__(self) -> None:
        gate = self._gate
        while gate._exclusive or gate._waiting_exclusive:
            await gate._changed.wait()
        gate._shared += 1

    async def __aexit__(self, *exc: object) -> None:
        gate = self._gate
        gate._shared -= 1
        # Only an exclusive holder waits for the shared ones to go (shared waiters wait
        # for the exclusive side, which notifies them itself).
        if gate._shared == 0 and gate._waiting_exclusive:
            gate._notify()
