"""Durability: WRITE completes after pwritev; with WCE=0, FUA or SYNCHRONIZE CACHE after fdatasync."""

from __future__ import annotations

import os
import struct

import pytest

from bridge.scsi import backing as backing_mod

from .helpers import assert_good, run, write10, write16


@pytest.fixture
def synced(monkeypatch):
    calls: list[int] = []
    real = os.fdatasync

    def spy(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(backing_mod.os, "fdatasync", spy)
    return calls


async def test_plain_write_with_wce_does_not_sync(target, synced):
    assert_good(await run(target, write10(0, 8), data_out=bytes(4096)))
    assert synced == []


async def test_fua_write_syncs(target, synced):
    assert_good(await run(target, write10(0, 8, flags=0x08), data_out=bytes(4096)))
    assert synced == [target.logical_unit("disk0").backing.fd]
    assert_good(await run(target, write16(0, 1, flags=0x08), data_out=bytes(512)))
    assert len(synced) == 2


async def test_synchronize_cache_syncs(target, synced):
    assert_good(await run(target, struct.pack(">BBIBHB", 0x35, 0, 0, 0, 0, 0)))
    assert len(synced) == 1


async def test_wce_off_syncs_every_write(target, synced):
    params = bytes(4) + bytes((0x08, 0x12, 0x00)) + bytes(17)
    assert_good(await run(target, bytes((0x15, 0x10, 0, 0, len(params), 0)), data_out=params))
    n = len(synced)  # turning WCE off flushes once
    assert n == 1
    assert_good(await run(target, write10(0, 8), data_out=bytes(4096)))
    assert_good(await run(target, write10(8, 1), data_out=bytes(512)))  # unaligned
    assert len(synced) == n + 2


async def test_sync_failure_is_a_write_error(target, monkeypatch):
    def fail(fd: int) -> None:
        raise OSError(5, "EIO")

    monkeypatch.setattr(backing_mod.os, "fdatasync", fail)
    r = await run(target, write10(0, 1, flags=0x08), data_out=bytes(512))
    assert r.status == 2 and r.sense_key == 3 and r.asc_ascq == (0x0C, 0x00)
