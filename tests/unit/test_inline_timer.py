"""Timed inline I/O (bridge/scsi/backing.py): a slow inline call sends that kind of I/O
to worker threads for a while, unless a thread round trip costs more than it did."""

from __future__ import annotations

import time

import trio

from bridge.scsi import backing
from bridge.scsi.backing import _InlineTimer


def _slow(seconds: float) -> int:
    time.sleep(seconds)
    return 1


def test_a_slow_inline_call_backs_off_when_threads_are_cheaper() -> None:
    timer = _InlineTimer("read")
    assert timer.call(_slow, 0) == 1 and timer.allowed()
    timer.hop = 0.0001  # a host: a thread hop costs 100 us
    timer.call(_slow, backing.INLINE_WRITE_SLOW * 2)
    assert not timer.allowed()  # threads for a while


def test_no_back_off_when_a_thread_hop_costs_more_than_the_slow_call() -> None:
    timer = _InlineTimer("read")
    timer.hop = 0.5  # a TCG dom0: a hop costs more than the slow inline call below
    timer.call(_slow, backing.INLINE_WRITE_SLOW * 2)
    assert timer.allowed()


async def test_the_thread_round_trip_is_measured() -> None:
    timer = _InlineTimer("write")
    await timer.in_thread(_slow, 0.02)
    first = timer.hop
    assert first >= 0.02
    await timer.in_thread(_slow, 0)
    assert 0 < timer.hop < first  # a moving average, not the last value
    with trio.fail_after(5):
        await timer.in_thread(_slow, 0)
