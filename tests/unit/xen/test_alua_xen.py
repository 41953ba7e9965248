"""A Xen vscsi device is a target port: its relative port reaches the core on every
request (ALUA state, page 83h), and a port down is DID_NO_CONNECT (bridge/scsi/ports.py)."""

from __future__ import annotations

import pytest
import trio

from bridge.scsi.alua import AccessState
from bridge.scsi.logical_unit import LogicalUnitSpec
from bridge.scsi.ports import GroupSpec, PortMap, PortSpec, change_states, port_down, port_up
from bridge.scsi.target import Target
from bridge.xen import vscsiif
from bridge.xen.backend import BackendConfig
from bridge.xen.vscsiif import RsltHost
from bridge.xen.xenstore import open_xenstore
from tests.xen_sim.platform import SimXen
from tests.xen_sim.xenstored import SimXenstored

from .conftest import INITIATOR, Env, MiB, running_backend
from .test_backend_io import TUR, clear_ua

VPD_83 = bytes((0x12, 1, 0x83, 1, 0, 0))


@pytest.fixture
async def env(tmp_path, nursery):
    spec = LogicalUnitSpec(name="disk0", path=str(tmp_path / "disk0.img"), size=4 * MiB)
    ports = PortMap([GroupSpec("xen-group", 7)], [PortSpec(3, "xen-group", "xen.guest1.0", INITIATOR)])
    target = Target([spec], {INITIATOR: {0: "disk0"}}, ports=ports)
    sim, xsd = SimXen(), SimXenstored(nursery)
    async with open_xenstore(await xsd.connect(0)) as xs0:
        yield Env(sim, xsd, xs0, target, nursery)
    target.close()


async def test_relative_port_state_and_port_down(env):
    async with running_backend(env, config=BackendConfig(relative_port=3)) as (_b, fe, _n):
        with trio.fail_after(10):
            await clear_ua(fe)
            r = await fe.submit(VPD_83, data_in_len=256)
            assert r.rslt == 0
            assert b"\x00\x00\x00\x03" in r.data and b"target,t,0x0003" in r.data
            group = env.target.ports.group("xen-group")
            change_states(env.target, {group: AccessState.STANDBY})
            await fe.submit(TUR)  # ASYMMETRIC ACCESS STATE CHANGED
            r = await fe.submit(TUR)
            assert r.rslt == vscsiif.rslt(RsltHost.OK, 0x02)
            assert (r.sense[2] & 0xF, r.sense[12], r.sense[13]) == (0x2, 0x04, 0x0B)
            change_states(env.target, {group: AccessState.ACTIVE_OPTIMIZED})
            port_down(env.target, env.target.ports.port(3))
            r = await fe.submit(TUR)
            assert (r.rslt >> 16) & 0xFF == RsltHost.NO_CONNECT
            port_up(env.target.ports.port(3))
            await clear_ua(fe)
