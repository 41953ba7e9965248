"""DmaSpaceImpl: mmap'd DMA regions, lookups, unmap rules (bridge/vfio_user/dma.py)."""

from __future__ import annotations

import errno
import os

import pytest

from bridge.vfio_user.device import DmaError
from bridge.vfio_user.dma import DmaMapError, DmaSpaceImpl

MIB = 1 << 20


@pytest.fixture
def memfd():
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, 4 * MIB)
    yield fd
    os.close(fd)


def test_view_reads_and_writes_the_file(memfd: int) -> None:
    dma = DmaSpaceImpl()
    dma.map(0x100000, MIB, True, True, memfd, MIB)  # file offset 1 MiB
    os.pwrite(memfd, b"hello", MIB + 0x10)
    assert bytes(dma.view(0x100010, 5, False)) == b"hello"
    dma.view(0x100020, 3, True)[:] = b"abc"
    assert os.pread(memfd, 3, MIB + 0x20) == b"abc"
    dma.unmap_all()


def test_unaligned_file_offset_is_honoured(memfd: int) -> None:
    dma = DmaSpaceImpl()
    os.pwrite(memfd, b"XY", 0x1234)
    dma.map(0x0, 0x1000, True, False, memfd, 0x1234)
    assert bytes(dma.view(0, 2, False)) == b"XY"
    dma.unmap_all()


def test_read_only_map_refuses_writable_views(memfd: int) -> None:
    dma = DmaSpaceImpl()
    dma.map(0, 0x1000, True, False, memfd, 0)
    v = dma.view(0, 16, False)
    assert v.readonly
    with pytest.raises(DmaError):
        dma.view(0, 16, True)
    v.release()
    dma.unmap_all()


def test_ranges_outside_or_across_maps(memfd: int) -> None:
    dma = DmaSpaceImpl()
    dma.map(0x0, 0x1000, True, True, memfd, 0)
    dma.map(0x1000, 0x1000, True, True, memfd, 0x1000)
    dma.map(0x10000, 0x1000, True, True, None, 0)  # no fd: not viewable
    for iova, n in ((0x2000, 1), (0xFFF, 2), (0x10000, 1), (2**64 - 1, 1), (0x800, -1)):
        with pytest.raises(DmaError):
            dma.view(iova, n, False)
    parts = dma.views(0xFF0, 0x20, True)
    assert [len(v) for v in parts] == [0x10, 0x10]
    with pytest.raises(DmaError):
        dma.views(0x1FF0, 0x20, False)
    dma.unmap_all()


def test_overlap_is_eexist_and_unmap_rules(memfd: int) -> None:
    dma = DmaSpaceImpl()
    dma.map(0x1000, 0x2000, True, True, memfd, 0)
    for iova, size in ((0x0, 0x1001), (0x2000, 0x1000), (0x2FFF, 1), (0, 0x10000)):
        with pytest.raises(DmaMapError) as exc:
            dma.map(iova, size, True, True, memfd, 0)
        assert exc.value.errno == errno.EEXIST
    dma.map(0x3000, 0x1000, True, True, None, 0)
    with pytest.raises(DmaMapError) as exc:
        dma.unmap(0x1000, 0x1000)  # would split a mapping
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(DmaMapError) as exc:
        dma.unmap(0x8000, 0x1000)
    assert exc.value.errno == errno.ENOENT
    dma.unmap(0x1000, 0x2000)
    assert len(dma) == 1
    with pytest.raises(DmaError):
        dma.view(0x1000, 1, False)


def test_unmap_with_live_view_is_deferred_not_unsafe(memfd: int) -> None:
    dma = DmaSpaceImpl()
    dma.map(0, 0x1000, True, True, memfd, 0)
    held = dma.view(0, 8, True)
    dma.unmap(0, 0x1000)
    assert dma.deferred_unmaps == 1
    held[:4] = b"live"  # still backed by the mapping: no use-after-unmap
    assert os.pread(memfd, 4, 0) == b"live"
    held.release()
    dma.map(0x5000, 0x1000, True, True, memfd, 0)
    dma.unmap(0x5000, 0x1000)  # retries the deferred one too
    assert dma.deferred_unmaps == 0


def test_map_limit_and_bad_fd() -> None:
    dma = DmaSpaceImpl(max_maps=1)
    dma.map(0, 0x1000, True, True, None, 0)
    with pytest.raises(DmaMapError) as exc:
        dma.map(0x1000, 0x1000, True, True, None, 0)
    assert exc.value.errno == errno.ENOSPC
    dma = DmaSpaceImpl()
    r, w = os.pipe()
    with pytest.raises(DmaMapError):
        dma.map(0, 0x1000, True, True, r, 0)  # a pipe cannot be mmap'd
    os.close(r)
    os.close(w)
    assert len(dma) == 0


async def test_read_write_fall_back_to_remote(memfd: int) -> None:
    dma = DmaSpaceImpl()
    dma.map(0, 0x1000, True, True, memfd, 0)
    dma.map(0xF0000, 0x10000, True, False, None, 0)  # ROM-like, no fd
    calls = []

    async def rread(iova: int, n: int) -> bytes:
        calls.append((iova, n))
        return bytes([iova & 0xFF]) * n

    async def rwrite(iova: int, data: bytes) -> None:
        calls.append((iova, data))

    with pytest.raises(DmaError):
        await dma.read(0xF0000, 4)  # no transport yet
    dma.set_remote(rread, rwrite, 0x800)
    assert await dma.read(0xF0000, 0x1000) == b"\0" * 0x800 + b"\0" * 0x800
    assert calls == [(0xF0000, 0x800), (0xF0800, 0x800)]
    with pytest.raises(DmaError):
        await dma.write(0xF0000, b"x")  # read-only
    await dma.write(0x10, b"direct")
    assert os.pread(memfd, 6, 0x10) == b"direct"
    assert await dma.read(0x10, 6) == b"direct"
    dma.unmap_all()


def test_views_kept_alive_only_by_a_garbage_cycle_do_not_defer_unmap(memfd: int) -> None:
    dma = DmaSpaceImpl()
    dma.map(0, 0x1000, True, True, memfd, 0)

    class Holder:
        pass

    h = Holder()
    h.view = dma.view(0, 8, True)  # type: ignore[attr-defined]
    h.me = h  # type: ignore[attr-defined]  # a cycle: freed only by the collector
    del h
    dma.unmap(0, 0x1000)
    assert dma.deferred_unmaps == 0
