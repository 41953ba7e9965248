"""Linux native AIO on O_DIRECT (bridge/scsi/aio.py) and the backing's direct-read path.

Real io_submit/io_getevents on a file of a real filesystem: tmp_path may be tmpfs, so
the files live under /var/tmp (or $VSCSI_AIO_TEST_DIR), checked to accept O_DIRECT; if no
such directory exists the tests fail with the reason.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import tempfile

import pytest
import trio
import trio.testing

from bridge.scsi import aio
from bridge.scsi.backing import Backing

SIZE = 1 << 20


def _o_direct_works(directory: str) -> str | None:
    """None when a 4 KiB O_DIRECT read works in ``directory``, else why not."""
    probe = os.path.join(directory, "probe")
    try:
        with open(probe, "wb") as f:
            f.write(bytes(8192))
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 4096)
            os.preadv(fd, [buf], 0)
        finally:
            os.close(fd)
    except OSError as e:
        return f"{e.strerror} ({e.filename or probe})"
    finally:
        if os.path.exists(probe):
            os.unlink(probe)
    return None


@pytest.fixture(scope="module")
def direct_dir():
    base = os.environ.get("VSCSI_AIO_TEST_DIR", "/var/tmp")
    try:
        d = tempfile.mkdtemp(prefix="vscsi-aio-test-", dir=base)
    except OSError as e:
        pytest.fail(f"cannot make a directory in {base} for the O_DIRECT tests: {e}")
    why = _o_direct_works(d)
    if why is not None:
        shutil.rmtree(d, ignore_errors=True)
        pytest.fail(f"O_DIRECT does not work in {d} ({why}): set VSCSI_AIO_TEST_DIR to a "
                    "directory on a filesystem that supports it")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_image(directory: str, name: str, size: int = SIZE) -> tuple[str, bytes]:
    """A file of random data, written back and evicted from the page cache (cold)."""
    path = os.path.join(directory, name)
    data = os.urandom(size)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return path, data


@pytest.fixture
def cold(direct_dir, request):
    path, data = make_image(direct_dir, request.node.name)
    b = Backing(path)
    yield b, data
    b.close()
    os.unlink(path)


def guest_memory(size: int) -> memoryview:
    """Page-aligned writable memory, like a mapped guest RAM region."""
    return memoryview(mmap.mmap(-1, size))


class Spy:
    """Counts the reads that went through AIO and through the thread path."""

    def __init__(self, monkeypatch, b: Backing) -> None:
        self.aio = 0
        self.aio_bytes = 0
        self.thread = 0
        real_aio, real_all = aio.preadv, b._preadv_all

        async def counting_aio(*args, **kwargs):
            n = await real_aio(*args, **kwargs)
            self.aio += 1
            self.aio_bytes += n
            return n

        def counting_all(views, offset, flags):
            if not flags:
                self.thread += 1
            return real_all(views, offset, flags)

        monkeypatch.setattr(aio, "preadv", counting_aio)
        monkeypatch.setattr(b, "_preadv_all", counting_all)


async def test_preadv_scatters_into_several_buffers(cold):
    b, data = cold
    mem = guest_memory(1 << 16)
    views = [mem[0:4096], mem[8192:8192 + 512], mem[16384:16384 + 12288]]
    n = await aio.preadv(b.direct_fd, views, 8192, 512)
    assert n == 4096 + 512 + 12288
    assert bytes(views[0]) == data[8192:12288]
    assert bytes(views[1]) == data[12288:12800]
    assert bytes(views[2]) == data[12800:25088]
    assert aio.current_context().in_flight == 0


async def test_cache_miss_goes_through_aio_not_a_thread(cold, monkeypatch):
    b, data = cold
    spy = Spy(monkeypatch, b)
    mem = guest_memory(64 << 10)
    await b.read_into(128 << 10, [mem])
    assert bytes(mem) == data[128 << 10:192 << 10]
    assert (spy.aio, spy.aio_bytes, spy.thread) == (1, 64 << 10, 0)


async def test_unaligned_requests_use_the_thread_path(cold, monkeypatch):
    b, data = cold
    b.nowait_reads = False  # as on a miss
    spy = Spy(monkeypatch, b)
    mem = guest_memory(16384)
    await b.read_into(100, [mem[:4096]])  # offset not a multiple of 512
    await b.read_into(4096, [mem[4096:4196]])  # length
    await b.read_into(8192, [mem[8193:8193 + 512]])  # address
    buf = bytearray(4096)
    await b.read_into(12288, [memoryview(buf)[1:513]])  # heap buffer, odd address
    assert bytes(mem[:4096]) == data[100:4196]
    assert bytes(mem[4096:4196]) == data[4096:4196]
    assert bytes(mem[8193:8193 + 512]) == data[8192:8704]
    assert bytes(buf[1:513]) == data[12288:12800]
    assert (spy.aio, spy.thread) == (0, 4)


async def test_read_only_and_unaligned_buffers_are_refused_before_submission(cold):
    b, _ = cold
    with pytest.raises(aio.AioUnsuitable):
        await aio.preadv(b.direct_fd, [memoryview(bytes(4096))], 0, 512)
    with pytest.raises(aio.AioUnsuitable):
        await aio.preadv(b.direct_fd, [guest_memory(4096)], 256, 512)
    with pytest.raises(aio.AioUnsuitable):
        await aio.preadv(b.direct_fd, [guest_memory(8192)[4:516]], 0, 512)
    assert aio.current_context().in_flight == 0


async def test_kernel_einval_is_redone_in_a_thread_and_alignment_raised(cold, monkeypatch):
    """Told that byte alignment is fine, the backing submits an odd-address read; the
    kernel's EINVAL completion is redone in a thread and the alignment raised to a page;
    a second EINVAL turns direct reads off."""
    b, data = cold
    b.nowait_reads = False
    b.direct_align = 1
    spy = Spy(monkeypatch, b)
    mem = guest_memory(8192)
    await b.read_into(4096, [mem[1:4097]])
    assert bytes(mem[1:4097]) == data[4096:8192]
    assert spy.thread == 1 and b.direct_align == 4096 and b.direct_fd is not None

    async def refuse(fd, views, offset, align=1):
        raise OSError(errno.EINVAL, "refused")

    monkeypatch.setattr(aio, "preadv", refuse)
    await b.read_into(0, [mem[:4096]])
    assert bytes(mem[:4096]) == data[:4096]
    assert b.direct_fd is None  # given up: every miss goes to a thread now
    await b.read_into(8192, [mem[:4096]])
    assert bytes(mem[:4096]) == data[8192:12288]


async def test_other_direct_read_errors_are_redone_in_a_thread(cold, monkeypatch):
    b, data = cold
    b.nowait_reads = False
    spy = Spy(monkeypatch, b)

    async def failing(fd, views, offset, align=1):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(aio, "preadv", failing)
    mem = guest_memory(4096)
    await b.read_into(4096, [mem])
    assert bytes(mem) == data[4096:8192] and spy.thread == 1 and b.direct_fd is not None


async def test_qd64_concurrent_reads_get_their_own_data(cold, monkeypatch):
    b, data = cold
    b.nowait_reads = False  # every read a miss (a miss's readahead could make hits)
    spy = Spy(monkeypatch, b)
    mem = guest_memory(64 * 8192)
    # 64 requests of 8 KiB at distinct offsets, in a shuffled order, all in flight at once.
    order = [(i * 37) % 128 for i in range(64)]
    submitted_before_first_completion = 0
    real_collect = aio.current_context()._collect

    def collect() -> None:  # the reaper's first pass sees how many were in flight
        nonlocal submitted_before_first_completion
        submitted_before_first_completion = (submitted_before_first_completion
                                             or aio.current_context().in_flight)
        real_collect()

    monkeypatch.setattr(aio.current_context(), "_collect", collect)

    async def one(slot: int, block: int) -> None:
        view = mem[slot * 8192:(slot + 1) * 8192]
        await b.read_into(block * 8192, [view[:4096], view[4096:]])

    async with trio.open_nursery() as n:
        for slot, block in enumerate(order):
            n.start_soon(one, slot, block)
    for slot, block in enumerate(order):
        assert bytes(mem[slot * 8192:(slot + 1) * 8192]) == data[block * 8192:(block + 1) * 8192]
    assert spy.aio == 64 and spy.thread == 0
    assert submitted_before_first_completion == 64  # all 64 were in the kernel at once
    assert aio.current_context().in_flight == 0


async def test_full_context_falls_back_to_threads(direct_dir, monkeypatch):
    monkeypatch.setattr(aio, "MAX_IN_FLIGHT", 4)  # this run's context is made below
    path, data = make_image(direct_dir, "full")
    b = Backing(path)
    b.nowait_reads = False  # every read a miss (a miss's readahead could make hits)
    try:
        spy = Spy(monkeypatch, b)
        mem = guest_memory(16 * 4096)
        async with trio.open_nursery() as n:
            for i in range(16):
                n.start_soon(b.read_into, (i * 5 % 64) * 4096, [mem[i * 4096:(i + 1) * 4096]])
        for i in range(16):
            assert bytes(mem[i * 4096:(i + 1) * 4096]) == data[(i * 5 % 64) * 4096:][:4096]
        assert aio.current_context().depth == 4
        assert spy.aio >= 4 and spy.thread >= 1 and spy.aio + spy.thread == 16
    finally:
        b.close()
        os.unlink(path)


async def test_cancelled_reader_waits_for_its_completion(cold):
    """Cancelling the task does not abandon the read: the kernel is writing into guest
    memory, so the task returns only after the completion, with the data there."""
    b, data = cold
    b.nowait_reads = False
    mem = guest_memory(SIZE // 2)
    got: dict[str, int] = {}

    async def reader(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            got["n"] = await aio.preadv(b.direct_fd, [mem], SIZE // 2, 512)
            got["returned"] = 1
            await trio.sleep(3600)  # the cancellation is delivered at this checkpoint
        got["cancelled"] = int(scope.cancelled_caught)

    async with trio.open_nursery() as n:
        scope = await n.start(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert aio.current_context().in_flight == 1 or "n" in got
        scope.cancel()
    assert got == {"n": SIZE // 2, "returned": 1, "cancelled": 1}
    assert bytes(mem) == data[SIZE // 2:]
    assert aio.current_context().in_flight == 0


async def test_cancelled_read_into_finishes_the_direct_read(cold):
    b, data = cold
    mem = guest_memory(256 << 10)
    with trio.move_on_after(0):  # already expired: cancelled at the first checkpoint
        await b.read_into(256 << 10, [mem])
    assert bytes(mem) == data[256 << 10:512 << 10]
    assert aio.current_context().in_flight == 0


async def test_direct_read_after_buffered_write_sees_the_new_data(cold, monkeypatch):
    """The kernel writes the dirty page-cache range back before an O_DIRECT read."""
    b, _ = cold
    spy = Spy(monkeypatch, b)
    new = os.urandom(12288)
    await b.write_from(16384, [memoryview(new)], sync=False)  # buffered, left dirty
    b.nowait_reads = False  # skip the page-cache hit: force the direct read
    mem = guest_memory(12288)
    await b.read_into(16384, [mem])
    assert bytes(mem) == new
    assert spy.aio == 1 and spy.thread == 0


async def test_short_direct_read_at_end_of_file_is_zero_filled(direct_dir):
    path, data = make_image(direct_dir, "short", 5000)
    b = Backing(path)
    try:
        b.nowait_reads = False
        mem = guest_memory(8192)
        mem[:] = b"?" * 8192
        await b.read_into(0, [mem])
        assert bytes(mem) == data + bytes(8192 - 5000)
    finally:
        b.close()
        os.unlink(path)


def test_each_trio_run_gets_its_own_context_closed_at_its_end(direct_dir):
    path, data = make_image(direct_dir, "runs")
    b = Backing(path)
    contexts = []

    async def one_run(offset: int) -> None:
        mem = guest_memory(4096)
        n = await aio.preadv(b.direct_fd, [mem], offset, 512)
        assert n == 4096 and bytes(mem) == data[offset:offset + 4096]
        contexts.append(aio.current_context())

    try:
        trio.run(one_run, 0)
        trio.run(one_run, 65536)
    finally:
        b.close()
        os.unlink(path)
    assert contexts[0] is not contexts[1]
    assert contexts[0].closed and contexts[1].closed


async def test_backing_without_o_direct_uses_threads(cold, monkeypatch):
    b, data = cold
    os.close(b.direct_fd)
    b.direct_fd = None  # as where the O_DIRECT open failed (tmpfs before Linux 6.6)
    b.nowait_reads = False
    spy = Spy(monkeypatch, b)
    mem = guest_memory(4096)
    await b.read_into(0, [mem])
    assert bytes(mem) == data[:4096] and (spy.aio, spy.thread) == (0, 1)



async def test_more_buffers_than_iov_max_use_the_thread_path(cold, monkeypatch):
    b, data = cold
    b.nowait_reads = False
    spy = Spy(monkeypatch, b)
    mem = guest_memory(1025 * 512)
    views = [mem[i * 512:(i + 1) * 512] for i in range(1025)]
    with pytest.raises(aio.AioUnsuitable):
        await aio.preadv(b.direct_fd, views, 0, 512)
    await b.read_into(0, views)
    assert bytes(mem) == data[:1025 * 512]
    assert (spy.aio, spy.thread) == (0, 1) and b.direct_align == 512


async def test_io_submit_refusal_is_not_taken_for_an_alignment_problem(cold, monkeypatch):
    """io_submit failing (here: a bad descriptor, EBADF) means not submitted: the
    read goes to a thread and the O_DIRECT settings stay as they were."""
    b, data = cold
    b.nowait_reads = False
    spy = Spy(monkeypatch, b)
    closed = -1
    with pytest.raises(aio.AioUnavailable):
        await aio.preadv(closed, [guest_memory(4096)], 0, 512)
    real_fd = b.direct_fd
    b.direct_fd = closed
    mem = guest_memory(4096)
    try:
        await b.read_into(4096, [mem])
    finally:
        b.direct_fd = real_fd
    assert bytes(mem) == data[4096:8192]
    assert spy.thread == 1 and b.direct_align == 512


def _refusing_open(monkeypatch, refuse):
    real_open = os.open

    def fake_open(name, flags, *args):
        err = refuse(str(name), flags)
        if err:
            raise OSError(err, os.strerror(err), name)
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", fake_open)


async def test_o_direct_refused_means_thread_reads(direct_dir, monkeypatch, caplog):
    """As on tmpfs before Linux 6.6: open(O_DIRECT) answers EINVAL."""
    path, data = make_image(direct_dir, "nodirect")
    _refusing_open(monkeypatch, lambda name, flags: errno.EINVAL if flags & os.O_DIRECT else 0)
    caplog.set_level("INFO", logger="bridge.scsi.backing")
    b = Backing(path)
    monkeypatch.undo()
    try:
        assert b.direct_fd is None
        assert "misses in worker threads (no O_DIRECT: Invalid argument)" in caplog.text
        spy = Spy(monkeypatch, b)
        b.nowait_reads = False
        mem = guest_memory(4096)
        await b.read_into(4096, [mem])
        assert bytes(mem) == data[4096:8192] and (spy.aio, spy.thread) == (0, 1)
    finally:
        b.close()
        os.unlink(path)


async def test_without_proc_the_direct_descriptor_is_opened_by_path(direct_dir, monkeypatch):
    path, data = make_image(direct_dir, "noproc")
    _refusing_open(monkeypatch, lambda name, flags: errno.ENOENT if name.startswith("/proc/") else 0)
    b = Backing(path)
    monkeypatch.undo()
    try:
        assert b.direct_fd is not None
        assert os.fstat(b.direct_fd).st_ino == os.fstat(b.fd).st_ino
        spy = Spy(monkeypatch, b)
        b.nowait_reads = False
        mem = guest_memory(4096)
        await b.read_into(8192, [mem])
        assert bytes(mem) == data[8192:12288] and (spy.aio, spy.thread) == (1, 0)
    finally:
        b.close()
        os.unlink(path)
