"""LUN hotplug (Reconfiguring/Reconfigured), close and reconnect, detach, destroyed domains."""

import trio

from bridge.xen import vscsiif
from bridge.xen.toolstack import backend_path, detach, hotplug_lun, reap_once

from .conftest import DOMID, INITIATOR, running_backend, wait_value
from .test_backend_io import INQUIRY, clear_ua, read10


async def test_target_lun_add_and_remove_reconfigure_the_guest(env):
    async with running_backend(env) as (backend, fe, _):
        be = fe.backend
        env.target.map_lun(INITIATOR, 3, "disk1")
        with trio.fail_after(5):
            while (0, 0, 3) not in fe.devices:
                await trio.sleep(0.005)
        await wait_value(env.xs0, f"{be}/state", 4)
        await wait_value(env.xs0, f"{be}/vscsi-devs/dev-1/state", 4)
        assert await env.xs0.read_str(f"{be}/vscsi-devs/dev-1/v-dev") == "0:0:0:3"
        assert await env.xs0.read_str(f"{be}/vscsi-devs/dev-1/p-dev") == "3"
        assert backend.luns[(0, 0, 3)] == 3
        assert [s for who, s in fe.state_log if who == "fe"][-2:] == [7, 4]
        await clear_ua(fe, (0, 0, 3))
        with trio.fail_after(5):
            r = await fe.submit(read10(0, 8), (0, 0, 3), data_in_len=4096)
        assert r.rslt == 0

        env.target.unmap_lun(INITIATOR, 3)
        with trio.fail_after(5):
            while (0, 0, 3) in fe.devices or await env.xs0.exists(f"{be}/vscsi-devs/dev-1"):
                await trio.sleep(0.005)
        await wait_value(env.xs0, f"{be}/state", 4)
        assert (0, 0, 3) not in backend.luns
        with trio.fail_after(5):
            r = await fe.submit(INQUIRY, (0, 0, 3), data_in_len=96)
        assert r.host == vscsiif.RsltHost.NO_CONNECT
        assert fe.devices == {(0, 0, 0)}


async def test_toolstack_hotplug_of_a_mapped_lun(env):
    env.target.map_lun(INITIATOR, 1, "disk2")  # mapped before the guest exists: no device yet
    async with running_backend(env) as (backend, fe, _):
        assert (0, 0, 1) not in fe.devices
        await hotplug_lun(env.xs0, DOMID, 0, 1, add=True)
        with trio.fail_after(5):
            while (0, 0, 1) not in fe.devices:
                await trio.sleep(0.005)
        await wait_value(env.xs0, f"{fe.backend}/state", 4)
        await hotplug_lun(env.xs0, DOMID, 0, 1, add=False)
        with trio.fail_after(5):
            while (0, 0, 1) in fe.devices:
                await trio.sleep(0.005)
        await wait_value(env.xs0, f"{fe.backend}/state", 4)
        assert (0, 0, 1) not in backend.luns


async def test_unmapped_lun_is_refused_at_attach(env):
    async with running_backend(env, luns=(0, 2)) as (backend, fe, _):
        be = fe.backend
        assert await env.xs0.read_int(f"{be}/vscsi-devs/dev-1/state") == 6  # refused: Closed
        assert fe.devices == {(0, 0, 0)} and backend.luns == {(0, 0, 0): 0}


async def test_close_and_reconnect_like_a_rebooted_frontend(env):
    async with running_backend(env) as (backend, fe, n):
        await clear_ua(fe)
        with trio.fail_after(5):
            await fe.close()
        assert backend.conn is None
        assert fe.leaked_grants == []
        assert env.sim.grant_table.mapped_count() == 0
        with trio.fail_after(5):
            await fe.reinitialise(n)
        await wait_value(env.xs0, f"{fe.backend}/vscsi-devs/dev-0/state", 4)
        assert backend.stats["connects"] == 2
        assert fe.devices == {(0, 0, 0)}
        await clear_ua(fe)
        with trio.fail_after(5):
            r = await fe.submit(read10(0, 8), data_in_len=4096)
        assert r.rslt == 0


async def test_detach_stops_backend_and_removes_nodes(env):
    async with running_backend(env) as (backend, fe, n):
        assert backend._on_target_event in env.target._subscribers
        with trio.fail_after(10):
            assert await detach(env.xs0, DOMID, 0)
        assert not await env.xs0.exists(fe.backend)
        assert not await env.xs0.exists(fe.path)
        with trio.fail_after(5):
            while backend._on_target_event in env.target._subscribers:
                await trio.sleep(0.005)  # a stopped backend no longer listens to the target
        assert backend._watch is None
        assert env.sim.grant_table.mapped_count() == 0


async def test_destroyed_domain_nodes_are_reaped(env):
    async with running_backend(env) as (backend, fe, n):
        be = fe.backend
        env.xsd.release_domain(DOMID)
        root = "/local/domain/0/backend/vscsi"
        assert await reap_once(env.xs0, root) == [DOMID]
        assert not await env.xs0.exists(be)
        with trio.fail_after(5):
            while backend._watch is not None:
                await trio.sleep(0.005)
        assert backend.conn is None
        assert be == backend_path(DOMID, 0)
