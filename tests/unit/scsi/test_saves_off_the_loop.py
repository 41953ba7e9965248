"""APTPL saves and MODE SELECT SP=1 write their files in a worker thread (issue 15 item 7).

While a save's fsync is slow, the event loop keeps serving other commands; the
command that saves completes only once its file is durable; state-changing
reservation commands on one LU stay serialized, each decided on the state its
predecessor committed, and saved in that order.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from bridge.scsi import state_file
from bridge.scsi.reservations import persistent_reservations, pr_in_cdb, pr_out_cdb
from bridge.scsi.reservations.state import state_path_for
from bridge.scsi.target import Target

from .helpers import INI_A, INI_B, assert_good, make_target, read10, run

REGISTER, RESERVE, REGISTER_IGNORE = 0, 1, 6
KEY_A, KEY_B = 0xAAAA, 0xBBBB
WAIT = 10  # seconds; a bound for the test, never reached when it passes


class SlowFsync:
    """os.fsync that blocks until released: a disk that takes its time."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        self._real = os.fsync

    def __call__(self, fd: int) -> None:
        self.calls += 1
        self.entered.set()
        if not self.release.wait(WAIT):
            raise AssertionError("fsync was never released")
        self._real(fd)


@pytest.fixture
def slow_fsync(monkeypatch: pytest.MonkeyPatch) -> Iterator[SlowFsync]:
    slow = SlowFsync()
    yield slow
    slow.release.set()  # never leave a worker thread blocked


def params(rkey: int, sakey: int, aptpl: bool = True) -> bytes:
    return struct.pack(">QQIBBH", rkey, sakey, 0, 0x01 if aptpl else 0, 0, 0)


async def prout(t: Target, ini: str, sa: int, rkey: int, sakey: int, rtype: int = 0,
                aptpl: bool = True, tag: int = 1) -> int:
    data = params(rkey, sakey, aptpl)
    r = await run(t, pr_out_cdb(sa, rtype, len(data)), data_out=data, initiator=ini, tag=tag)
    return r.status


async def generation(t: Target) -> int:
    r = await run(t, pr_in_cdb(0, 8), data_in=8, initiator=INI_B)
    return struct.unpack(">I", r.data[:4])[0]


async def test_the_loop_serves_other_commands_while_an_aptpl_save_fsyncs(
        tmp_path: Path, slow_fsync: SlowFsync, monkeypatch: pytest.MonkeyPatch) -> None:
    t = make_target(tmp_path)
    try:
        for ini in (INI_A, INI_B):
            assert_good(await run(t, bytes(6), initiator=ini))  # power-on UAs consumed
        monkeypatch.setattr(state_file.os, "fsync", slow_fsync)
        acked = trio.Event()
        statuses: list[int] = []

        async def register() -> None:
            statuses.append(await prout(t, INI_A, REGISTER, 0, KEY_A))
            acked.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(register)
            await trio.to_thread.run_sync(slow_fsync.entered.wait, WAIT)
            # The save is inside fsync. Other commands keep completing meanwhile ...
            ticks = 0
            for _ in range(20):
                assert_good(await run(t, read10(0, 1), data_in=512, initiator=INI_B))
                ticks += 1
            assert ticks == 20
            # ... the PR OUT has not completed, and its state is not yet visible.
            assert not acked.is_set()
            assert await generation(t) == 0
            assert not os.path.exists(state_path_for(str(tmp_path / "disk0.img")))
            slow_fsync.release.set()
            with trio.fail_after(WAIT):
                await acked.wait()
        assert statuses == [0]
        assert await generation(t) == 1
        with open(state_path_for(str(tmp_path / "disk0.img"))) as f:
            assert json.load(f)["generation"] == 1  # durable before it was acknowledged
    finally:
        t.close()


async def test_a_slow_mode_page_save_does_not_stop_the_loop(
        tmp_path: Path, slow_fsync: SlowFsync, monkeypatch: pytest.MonkeyPatch) -> None:
    t = make_target(tmp_path)
    try:
        assert_good(await run(t, bytes(6), initiator=INI_B))
        monkeypatch.setattr(state_file.os, "fsync", slow_fsync)
        page = bytes((0x08, 0x12, 0x00)) + bytes(17)  # caching page, WCE=0
        data = bytes(4) + page
        done = trio.Event()

        async def mode_select_saved() -> None:
            cdb = bytes((0x15, 0x11, 0, 0, len(data), 0))  # PF=1, SP=1
            assert_good(await run(t, cdb, data_out=data))
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(mode_select_saved)
            await trio.to_thread.run_sync(slow_fsync.entered.wait, WAIT)
            for _ in range(10):
                assert_good(await run(t, read10(0, 1), data_in=512, initiator=INI_B))
            assert not done.is_set()
            lu = t.logical_unit("disk0")
            assert lu.mode.wce and lu.mode.saved[0x08][2] & 0x04  # nothing applied yet
            slow_fsync.release.set()
            with trio.fail_after(WAIT):
                await done.wait()
        assert not lu.mode.wce and not lu.mode.saved[0x08][2] & 0x04
    finally:
        t.close()


def record_saves(monkeypatch: pytest.MonkeyPatch, gate: threading.Event,
                 entered: threading.Event) -> list[int]:
    """Patch the reservation save: record each saved generation, hold the first until ``gate``."""
    saved: list[int] = []
    real: Callable[[str, bytes], None] = persistent_reservations.save_state

    def save(path: str, payload: bytes) -> None:
        saved.append(json.loads(payload)["generation"])
        entered.set()
        if len(saved) == 1 and not gate.wait(WAIT):
            raise AssertionError("first save never released")
        real(path, payload)

    monkeypatch.setattr(persistent_reservations, "save_state", save)
    return saved


async def test_pr_outs_on_one_lu_are_decided_and_saved_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = make_target(tmp_path)
    gate, entered = threading.Event(), threading.Event()
    try:
        for ini in (INI_A, INI_B):
            assert_good(await run(t, bytes(6), initiator=ini))
        saved = record_saves(monkeypatch, gate, entered)
        results: dict[str, int] = {}

        async def command(name: str, tag: int, ini: str, sa: int, rkey: int, sakey: int,
                          rtype: int = 0) -> None:
            # distinct tags: these are concurrent tasks of one I_T nexus (SAM-5 5.10)
            results[name] = await prout(t, ini, sa, rkey, sakey, rtype, tag=tag)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(command, "register A", 11, INI_A, REGISTER, 0, KEY_A)
            await trio.to_thread.run_sync(entered.wait, WAIT)
            assert saved == [1]  # A's save is under way (held)
            # Arriving while A's save is in flight: A's RESERVE needs A's registration,
            # which is not committed yet; B registers too.
            nursery.start_soon(command, "reserve A", 12, INI_A, RESERVE, KEY_A, 0, 1)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(command, "register B", 13, INI_B, REGISTER_IGNORE, 0, KEY_B)
            await trio.testing.wait_all_tasks_blocked()
            assert saved == [1]  # neither was decided on the uncommitted state
            assert results == {}
            gate.set()
        # Each was decided on the state its predecessor committed: the RESERVE found
        # A registered (GOOD, not RESERVATION CONFLICT); saves in the order applied.
        assert results == {"register A": 0, "reserve A": 0, "register B": 0}
        assert saved == [1, 1, 2]  # RESERVE does not bump PRGENERATION (SPC-4 6.15.2)
        status = t.logical_unit("disk0").reservations.status()
        with open(state_path_for(str(tmp_path / "disk0.img"))) as f:
            on_disk = json.load(f)
        assert on_disk["generation"] == status["generation"] == 2
        assert on_disk["reservation"]["holder"] == INI_A == status["holder"]
        assert [r["initiator"] for r in on_disk["registrations"]] == [INI_A, INI_B]
    finally:
        gate.set()
        t.close()


async def test_a_pr_out_cancelled_during_its_save_keeps_memory_and_file_in_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bridge.scsi.request import InitiatorPort

    path = str(tmp_path / "lu.pr.json")
    pr = persistent_reservations.PersistentReservations("lu", path, lambda *a: None)
    gate, entered = threading.Event(), threading.Event()
    saved = record_saves(monkeypatch, gate, entered)
    data = params(0, KEY_A)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pr.handle, InitiatorPort(INI_A), pr_out_cdb(REGISTER, 0, 24),
                               data, 0)
            await trio.to_thread.run_sync(entered.wait, WAIT)
            assert saved == [1]
            scope.cancel()  # the task is cancelled while its file is being written
            gate.set()
    assert scope.cancel_called
    # The write was not interrupted: the state it wrote is the state in memory.
    with open(path) as f:
        assert json.load(f)["generation"] == pr.status()["generation"] == 1
