"""The server answers DMA_UNMAP only once the device dropped its views into the region
(vfio-user.rst DMA_UNMAP; issue 15 item 10), and not later than its settle timeout."""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from pathlib import Path

import trio

from bridge.vfio_user import protocol as p
from tests.unit.vfio_user.test_server import (
    DummyDevice,
    connect,
    dma_map,
    memfd,
    running,
    wait_for,
)


async def test_dma_unmap_reply_waits_for_views_in_flight() -> None:
    d = Path(tempfile.mkdtemp(prefix="vfu-", dir="/tmp"))  # unix socket paths are short
    dev = DummyDevice()
    ram = memfd(1 << 20)
    try:
        async with running(d, dev) as path, trio.open_nursery() as nursery:
            c = await connect(path)
            await c.handshake()
            await c.call(p.Command.DMA_MAP, dma_map(0, 1 << 20), (ram,))
            assert dev.dma is not None
            held = dev.dma.view(0x1000, 512, True)  # a request in flight into the region
            replied = trio.Event()

            async def unmap() -> None:
                hdr, _, _ = await c.call(p.Command.DMA_UNMAP,
                                         struct.pack("=IIQQ", 24, 0, 0, 1 << 20))
                assert not hdr.flags & p.FLAG_ERROR
                replied.set()

            nursery.start_soon(unmap)
            await wait_for(lambda: dev.dma.deferred_unmaps == 1)  # the unmap was handled
            await trio.sleep(0.1)
            assert not replied.is_set()  # but not answered while the view is there
            held[:4] = b"done"  # still the region's memory: the request completes
            held.release()
            with trio.fail_after(1):
                await replied.wait()
            assert dev.dma.deferred_unmaps == 0
            nursery.cancel_scope.cancel()
    finally:
        os.close(ram)
        shutil.rmtree(d, ignore_errors=True)


async def test_settle_gives_up_after_its_timeout(caplog) -> None:
    """A request that never lets go does not hold the client (QEMU waits with its BQL)."""
    from bridge.vfio_user.dma import DmaSpaceImpl

    dma = DmaSpaceImpl()
    ram = memfd(1 << 16)
    try:
        dma.map(0, 1 << 16, True, True, ram, 0)
        held = dma.view(0, 16, True)
        dma.unmap(0, 1 << 16)
        with trio.fail_after(1):
            await dma.settle(timeout=0.05)
        assert not dma.unsettled and dma.deferred_unmaps == 1
        assert "still holds views" in caplog.text
        held.release()
        dma.unmap_all()  # retried with the next unmap
        assert dma.deferred_unmaps == 0
    finally:
        os.close(ram)
