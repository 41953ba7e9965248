"""Transfer limits per path (issue 13): the Block Limits VPD page a guest reads through a
target port says, in logical blocks, what the port's transport can carry; the core
enforces the same number."""

from __future__ import annotations

import struct

import pytest

from bridge.scsi import block_limits as bl
from bridge.scsi.request import InitiatorPort, TargetPort
from bridge.virtio.scsi_device import VirtioScsiPciDevice

from .helpers import MiB, assert_check, assert_good, make_target, read10, run, write10


def block_limits_page(r):
    assert r.data[1] == 0xB0
    max_len, opt_len = struct.unpack_from(">II", r.data, 8)
    return max_len, opt_len


INQ_B0 = bytes((0x12, 0x01, 0xB0, 0x00, 0xFF, 0x00))


@pytest.mark.parametrize("block_size", [512, 4096])
async def test_vpd_follows_the_port_byte_limit(tmp_path, block_size):
    t = make_target(tmp_path, block_size=block_size, size=16 * MiB)
    try:
        port = TargetPort("p", max_transfer_bytes=1 << 20)
        r = await run(t, INQ_B0, data_in=255, target_port=port)
        assert_good(r)
        assert block_limits_page(r) == ((1 << 20) // block_size, (1 << 20) // block_size)
        # no port limit: the core's own ceiling
        r = await run(t, INQ_B0, data_in=255)
        assert block_limits_page(r)[0] == bl.MAX_TRANSFER_BYTES // block_size
        # a port above the core's ceiling is capped by it
        big = TargetPort("big", max_transfer_bytes=1 << 30)
        r = await run(t, INQ_B0, data_in=255, target_port=big)
        assert block_limits_page(r)[0] == bl.MAX_TRANSFER_BYTES // block_size
        # a small port: OPTIMAL TRANSFER LENGTH never exceeds the maximum
        small = TargetPort("small", max_transfer_bytes=64 << 10)
        r = await run(t, INQ_B0, data_in=255, target_port=small)
        assert block_limits_page(r) == ((64 << 10) // block_size,) * 2
    finally:
        t.close()


@pytest.mark.parametrize("block_size", [512, 4096])
async def test_transfer_length_enforced_per_port(tmp_path, block_size):
    t = make_target(tmp_path, block_size=block_size, size=16 * MiB)
    try:
        port = TargetPort("p", max_transfer_bytes=1 << 20)
        n = (1 << 20) // block_size
        r = await run(t, write10(0, n), data_out=bytes(n * block_size), target_port=port)
        assert_good(r)
        r = await run(t, write10(0, n + 1), data_out=bytes((n + 1) * block_size), target_port=port)
        assert_check(r, 0x05, 0x24)  # INVALID FIELD IN CDB: the TRANSFER LENGTH
        assert r.field_pointer == (True, 7, None)
        r = await run(t, read10(0, n + 1), data_in=(n + 1) * block_size, target_port=port)
        assert_check(r, 0x05, 0x24)
        # the same transfer through a port that carries it
        r = await run(t, read10(0, n + 1), data_in=(n + 1) * block_size,
                      target_port=TargetPort("q", max_transfer_bytes=4 << 20))
        assert_good(r)
    finally:
        t.close()


def test_virtio_device_declares_max_sectors_as_its_port_limit(tmp_path):
    t = make_target(tmp_path)
    try:
        dev = VirtioScsiPciDevice(t, InitiatorPort("iqn.x"), num_queues=1, max_sectors=2048)
        assert dev.target_port.max_transfer_bytes == 2048 * 512
        dev = VirtioScsiPciDevice(t, InitiatorPort("iqn.x"), num_queues=1)
        assert dev.target_port.max_transfer_bytes == 512 * dev.max_sectors
    finally:
        t.close()
