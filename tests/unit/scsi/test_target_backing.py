"""Backing store: read paths (inline RWF_NOWAIT, thread), writes, hole punching fallbacks."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from bridge.scsi import backing as backing_mod
from bridge.scsi.backing import Backing, create_sparse_image
from bridge.scsi.identity import parse_wwn


@pytest.fixture
def image(tmp_path):
    path = str(tmp_path / "img")
    create_sparse_image(path, 1 << 20)
    b = Backing(path)
    yield b
    b.close()


@pytest.mark.parametrize("nowait", [True, False])
async def test_read_write_paths(image, nowait):
    image.nowait_reads = nowait
    data = os.urandom(8192)
    await image.write_from(4096, [memoryview(data)[:100], memoryview(data)[100:]], sync=False)
    out = [bytearray(5000), bytearray(3192)]
    await image.read_into(4096, [memoryview(b) for b in out])
    assert b"".join(out) == data


async def test_synchronous_and_unaligned_writes(image):
    await image.write_from(0, [memoryview(b"a" * 512)], sync=True)
    await image.write_from(512, [memoryview(b"b" * 512)], sync=False)
    buf = bytearray(1024)
    await image.read_into(0, [memoryview(buf)])
    assert buf == b"a" * 512 + b"b" * 512


async def test_read_past_end_of_short_file_is_zero_filled(tmp_path):
    path = str(tmp_path / "short")
    with open(path, "wb") as f:
        f.write(b"x" * 1000)
    b = Backing(path)
    try:
        buf = bytearray(b"?" * 2048)
        b.nowait_reads = False
        await b.read_into(0, [memoryview(buf)])
        assert buf == b"x" * 1000 + bytes(1048)
    finally:
        b.close()


async def test_create_sparse_image_never_overwrites(tmp_path):
    path = str(tmp_path / "img")
    create_sparse_image(path, 1 << 20)
    assert os.stat(path).st_size == 1 << 20 and os.stat(path).st_blocks == 0
    with pytest.raises(FileExistsError):
        create_sparse_image(path, 2 << 20)


async def test_punch_hole_and_mapped_extent(image):
    await image.write_from(0, [memoryview(os.urandom(64 << 10))], sync=False)
    assert image.mapped_extent(0) == (True, 64 << 10)
    await image.punch_hole(16 << 10, 16 << 10)
    assert image.mapped_extent(0) == (True, 16 << 10)
    assert image.mapped_extent(16 << 10) == (False, 16 << 10)
    assert image.mapped_extent(64 << 10) == (False, (1 << 20) - (64 << 10))
    buf = bytearray(16 << 10)
    await image.read_into(16 << 10, [memoryview(buf)])
    assert buf == bytes(16 << 10)


class RefusingLibc:
    def __init__(self) -> None:
        self.modes: list[int] = []

    def fallocate(self, fd, mode, offset, length):
        self.modes.append(mode)
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1


async def test_punch_falls_back_to_zero_writes(image, monkeypatch):
    fake = RefusingLibc()
    monkeypatch.setattr(backing_mod, "_libc", fake)
    await image.write_from(0, [memoryview(b"\xff" * 8192)], sync=False)
    await image.punch_hole(0, 8192)
    assert fake.modes == [0x03, 0x11]  # PUNCH_HOLE|KEEP_SIZE, then ZERO_RANGE|KEEP_SIZE
    buf = bytearray(8192)
    await image.read_into(0, [memoryview(buf)])
    assert buf == bytes(8192)


def test_parse_wwn():
    assert parse_wwn("naa.6" + "0" * 31)[0] == 0x60
    assert len(parse_wwn("naa.5001405abcdef012")) == 8
    assert parse_wwn("naa.6001405abcdef012") == bytes.fromhex("6001405abcdef012") + bytes(8)
    for bad in ("naa.1234", "naa.4001405abcdef012", "eui.6001405abcdef012",
                "naa.5" + "0" * 31):
        with pytest.raises(ValueError):
            parse_wwn(bad)


async def test_reads_inline_and_timed_where_rwf_nowait_is_refused(image, monkeypatch):
    """tmpfs before Linux 6.6 answers RWF_NOWAIT reads with EOPNOTSUPP: the first read
    goes to a thread, later ones are read inline (timed), and a slow one backs off."""
    data = os.urandom(4096)
    await image.write_from(0, [memoryview(data)], sync=False)
    real_preadv = os.preadv

    def preadv(fd, buffers, offset, flags=0):
        if flags:
            raise OSError(errno.EOPNOTSUPP, "no RWF_NOWAIT here")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(backing_mod.os, "preadv", preadv)
    buf = bytearray(4096)
    assert not image.read_inline(0, [memoryview(buf)])  # refused: the caller uses a thread
    assert not image.nowait_reads and image.timed_inline_reads
    assert image.read_inline(0, [memoryview(buf)]) and buf == data  # now inline
    image._read_timer.until = float("inf")  # as after a slow inline read
    assert not image.read_inline(0, [memoryview(bytearray(4096))])
    out = bytearray(4096)
    await image.read_into(0, [memoryview(out)])  # the thread path still reads right
    assert out == data
