"""The virtio-scsi device is one target port: it names it on every request, and the core's
PORT_DOWN (a failed link) is virtio TRANSPORT_FAILURE."""

from __future__ import annotations

from bridge.scsi.request import ServiceResponse, TargetPort
from bridge.virtio.scsi_wire import RESPONSE_CODE, VirtioScsiResponse

from .test_scsi_device import booted


async def test_requests_carry_the_device_s_target_port(nursery):
    port = TargetPort("iqn.2026-11.org.vscsi-bridge:target,t,0x0002", 2)
    g = await booted(nursery, target_port=port)
    resp, _, _ = await g.run_cmd(b"\x00")
    assert resp["response"] == VirtioScsiResponse.OK
    got = g.target.requests[0].target_port
    # The device's relative id and name; the transfer limit is the device's own (max_sectors).
    assert (got.name, got.relative_id) == (port.name, 2)
    assert got.max_transfer_bytes == 512 * g.dev.max_sectors


def test_port_down_is_transport_failure():
    assert RESPONSE_CODE[ServiceResponse.PORT_DOWN] == VirtioScsiResponse.TRANSPORT_FAILURE
