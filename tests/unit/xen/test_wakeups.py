"""Wake-ups between the backend and a frontend that follows ring.h and xen-scsifront exactly.

A lost wake-up does not show as an error: the side that missed it sleeps until some
unrelated event (or forever). These tests count every notification both ways:

- the frontend notifies only when RING_PUSH_REQUESTS_AND_CHECK_NOTIFY says so; the
  backend must still see every request (its req_event is armed right);
- the backend must notify for every response the frontend asked for (rsp_event), and
  never spuriously: xen-scsifront ends its interrupt with xen_irq_lateeoi(SPURIOUS)
  when it found no response, and Linux then delays that event channel's unmask
  exponentially (up to a second), so stray notifications cost the guest real time;
- Xen marks the backend's local port pending when it binds (evtchn_bind_interdomain:
  notifications sent before the bind are otherwise lost), the simulated platform does too.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from functools import partial

import trio

from bridge.xen import ring_service as ring_service_module
from bridge.xen import vscsiif
from bridge.xen.ring import FrontRing
from tests.xen_sim.platform import SimEventChannel

from .conftest import running_backend

TUR = bytes(6)
READ10_1 = bytes([0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0])


def strict_response_loop(fe, spurious: list[int]):
    """xen-scsifront's scsifront_irq_fn: drain, final check, EOI; count empty (spurious) events."""

    async def loop(ring: FrontRing, evtchn: SimEventChannel) -> None:
        # An interrupt handler: it runs on an event only. (Draining before the first event
        # would take a response whose notification is already pending, and then count
        # that notification as spurious: the frontend's timing, not the backend's fault.)
        first = True
        while fe.ring is ring:
            await evtchn.wait()
            fe.notifies_received += 1
            found = 0
            while True:
                for raw in ring.take_responses():
                    fe._complete(vscsiif.decode_response(raw))
                    found += 1
                if not ring.final_check_for_responses():
                    break
            if not first and found == 0:
                spurious.append(fe.responses_seen)
            first = False

    return loop


@asynccontextmanager
async def _connected(env, spurious: list[int]):
    async with running_backend(env, connect=False) as (backend, fe, n):
        fe._response_loop = strict_response_loop(fe, spurious)
        with trio.fail_after(5):
            await fe.connect(n)
        yield backend, fe


async def _clear_ua(fe) -> None:
    for _ in range(4):
        with trio.fail_after(5):
            rslt = (await fe.submit(TUR)).rslt
        if rslt == 0:
            return
    raise AssertionError("unit attention does not clear")


async def test_qd1_every_request_seen_and_every_response_notified_once(env):
    spurious: list[int] = []
    async with _connected(env, spurious) as (backend, fe):
        await _clear_ua(fe)
        before_rsp, before_ntf = fe.responses_seen, fe.notifies_received
        before_be = backend.stats["notifies"]
        with trio.fail_after(20):
            for _ in range(100):
                assert (await fe.submit(TUR)).rslt == 0
            for _ in range(50):
                r = await fe.submit(READ10_1, data_in_len=512)
                assert r.rslt == 0 and len(r.data) == 512
        assert fe.responses_seen - before_rsp == 150
        # QD1: the frontend sleeps on every response, so each one needs exactly one notify.
        assert backend.stats["notifies"] - before_be == 150
        assert fe.notifies_received - before_ntf == 150
        assert spurious == []


async def test_qd16_bursts_no_lost_or_spurious_wakeups(env):
    spurious: list[int] = []
    async with _connected(env, spurious) as (backend, fe):
        await _clear_ua(fe)
        before, before_be = fe.responses_seen, backend.stats["notifies"]
        with trio.fail_after(20):
            for _ in range(10):
                async with trio.open_nursery() as n:
                    for _ in range(16):
                        n.start_soon(partial(fe.submit, READ10_1, data_in_len=512))
        assert fe.responses_seen - before == 160
        assert spurious == []
        # Responses pushed while the frontend has not re-armed rsp_event need no notify
        # (RING_PUSH_RESPONSES_AND_CHECK_NOTIFY): bursts coalesce.
        notifies = backend.stats["notifies"] - before_be
        assert 10 <= notifies < 160, notifies


async def test_requests_pushed_without_notify_are_served_after_final_check(env):
    """A frontend that pushes while the backend is busy gets no notify request (req_event not
    reached yet): the backend must find those requests in its final check, not sleep on them."""
    spurious: list[int] = []
    async with _connected(env, spurious) as (backend, fe):
        await _clear_ua(fe)
        sent = 0
        orig_notify = fe.evtchn.notify

        def counting_notify() -> None:
            nonlocal sent
            sent += 1
            orig_notify()

        fe.evtchn.notify = counting_notify
        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                for _ in range(48):
                    n.start_soon(fe.submit, TUR)
        # 48 requests through a 16-slot ring, far fewer notifications than requests.
        assert backend.stats["requests"] >= 48
        assert 1 <= sent < 48


async def test_bind_marks_the_backend_port_pending_like_xen(env):
    """evtchn_bind_interdomain sets the new local port pending; the sim must too (a backend
    that relied on seeing no event before its first wait would be wrong on real Xen)."""
    spurious: list[int] = []
    async with _connected(env, spurious) as (backend, fe):
        ch = backend.conn.evtchn
        assert ch.raised_at_bind
        # The first wait consumed it: the backend is idle on an empty ring now.
        await _clear_ua(fe)
        assert (await fe.submit(TUR)).rslt == 0


async def test_lost_request_notification_is_recovered_by_the_ring_watch(env, monkeypatch):
    """A frontend notification that never arrives: the ring watch finds the published
    request after two checks, logs it and serves it (the guest pauses instead of hanging)."""
    monkeypatch.setattr(ring_service_module, "WATCH_INTERVAL", 0.05)
    spurious: list[int] = []
    async with _connected(env, spurious) as (backend, fe):
        await _clear_ua(fe)
        orig_notify = fe.evtchn.notify
        dropped = []
        fe.evtchn.notify = lambda: dropped.append(1)
        with trio.fail_after(5):
            assert (await fe.submit(TUR)).rslt == 0
        fe.evtchn.notify = orig_notify
        assert dropped == [1]
        assert backend.stats["lost_wakeups"] == 1


async def test_lost_response_notification_is_recovered_by_the_ring_watch(env, monkeypatch):
    """The backend's notification is lost: the frontend asked for it (rsp_event <= rsp_prod)
    and still waits at the next two checks, so the watch notifies once more."""
    monkeypatch.setattr(ring_service_module, "WATCH_INTERVAL", 0.05)
    spurious: list[int] = []
    async with _connected(env, spurious) as (backend, fe):
        await _clear_ua(fe)
        ch = backend.conn.evtchn
        orig_notify = ch.notify
        dropped = []

        def drop_once() -> None:
            if not dropped:
                dropped.append(1)
                return
            orig_notify()

        ch.notify = drop_once
        with trio.fail_after(5):
            assert (await fe.submit(TUR)).rslt == 0
        assert dropped == [1]
        assert backend.stats["lost_wakeups"] == 1
        # and nothing more: a frontend that keeps up is never notified by the watch
        with trio.fail_after(5):
            for _ in range(20):
                assert (await fe.submit(TUR)).rslt == 0
        await trio.sleep(0.3)
        assert backend.stats["lost_wakeups"] == 1


async def test_request_published_right_after_the_backend_looked_is_served(env):
    """The frontend publishes between the backend's read of req_prod (ring empty) and its
    next look at the ring, with nothing in flight: the backend must not wait for a slot to
    free (none will) but take the request. Seen on real Xen as a LUN scan that never ended."""
    spurious: list[int] = []
    async with _connected(env, spurious) as (backend, fe):
        await _clear_ua(fe)
        ring = backend.conn.ring
        held: list[bytes] = []
        orig_push, orig_take = fe.push, ring.take_requests

        def held_push(raw: bytes) -> None:
            held.append(raw)  # not on the ring yet: only the event goes out
            fe.evtchn.notify()

        def racy_take(limit=None):
            out = orig_take(limit)
            if not out and held:
                orig_push(held.pop())  # published just after the backend found none
            return out

        fe.push = held_push
        ring.take_requests = racy_take
        with trio.fail_after(5):
            assert (await fe.submit(TUR)).rslt == 0
        fe.push = orig_push
        assert backend.stats["lost_wakeups"] == 0
