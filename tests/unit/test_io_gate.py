"""The LU write gate: exclusive holders (COMPARE AND WRITE, ORWRITE, WRITE ATOMIC) run
alone; shared ones (reads, writes) queue behind a waiting exclusive one."""

from __future__ import annotations

import trio
import trio.testing

from bridge.scsi.io_gate import IoGate


async def test_exclusive_waits_for_shared_holders_then_shared_waits_for_it() -> None:
    gate = IoGate()
    order: list[str] = []
    release_shared = trio.Event()
    release_exclusive = trio.Event()

    async def reader(name: str, until: trio.Event) -> None:
        async with gate.shared():
            order.append(f"{name} in")
            await until.wait()
        order.append(f"{name} out")

    async def writer() -> None:
        async with gate.exclusive():
            order.append("exclusive in")
            await release_exclusive.wait()
        order.append("exclusive out")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader, "r1", release_shared)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["r1 in"]  # the exclusive one waits for the shared holder
        nursery.start_soon(reader, "r2", trio.Event())  # arrives behind the waiting writer
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["r1 in"]
        release_shared.set()
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["r1 in", "r1 out", "exclusive in"]
        release_exclusive.set()
        await trio.testing.wait_all_tasks_blocked()
        assert order[3:] == ["exclusive out", "r2 in"]
        nursery.cancel_scope.cancel()


async def test_shared_holders_overlap_and_the_count_returns_to_zero() -> None:
    gate = IoGate()
    async with gate.shared():
        async with gate.shared():
            assert gate._shared == 2
            assert gate.shared_free()
    assert gate._shared == 0
    async with gate.exclusive():
        assert not gate.shared_free()
    assert gate.shared_free()
