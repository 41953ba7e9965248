"""The runner: one backend task per vscsi device of configured domains, crashes isolated."""

from contextlib import AsyncExitStack

import trio

from bridge.xen.backend import VscsiBackend
from bridge.xen.runner import XenConfig, XenDomainConfig, run_xen_backend
from bridge.xen.toolstack import attach, detach
from bridge.xen.xenstore import open_xenstore

from .frontend import SimFrontend
from .test_backend_io import INQUIRY


async def start_guest(env, domid, name, stack):
    env.sim.grant_table.add_domain(domid, pages=256)
    env.xsd.introduce_domain(domid, name)
    return await start_guest_again(env, domid, stack)


async def start_guest_again(env, domid, stack):
    await attach(env.xs0, domid, 0, [0])
    xs = await stack.enter_async_context(open_xenstore(await env.xsd.connect(domid)))
    return SimFrontend(env.sim, xs, domid, 0)


async def test_runner_serves_configured_domains_and_isolates_crashes(env, monkeypatch, caplog):
    real_step = VscsiBackend._step

    async def step(self):
        if self.domid == 7:
            raise RuntimeError("injected crash")
        return await real_step(self)

    monkeypatch.setattr(VscsiBackend, "_step", step)
    config = XenConfig(domains=[XenDomainConfig(name="victim"), XenDomainConfig(domid=7),
                                XenDomainConfig(name="bystander")])
    async with AsyncExitStack() as stack:
        n = await stack.enter_async_context(trio.open_nursery())
        await n.start(lambda task_status: run_xen_backend(
            env.target, env.sim.platform, config, env.xs0, task_status=task_status))
        fe5 = await start_guest(env, 5, "victim", stack)
        fe7 = await start_guest(env, 7, "crasher", stack)
        fe8 = await start_guest(env, 8, "unlisted", stack)
        with trio.fail_after(5):
            await fe5.connect(n)
        with trio.fail_after(5):
            r = await fe5.submit(INQUIRY, data_in_len=96)
        assert r.rslt == 0
        with trio.fail_after(5):
            while not any("crashed" in rec.getMessage() for rec in caplog.records):
                await trio.sleep(0.005)
        # domain 8 is not configured: nobody answers it
        assert await env.xs0.read_int(f"{fe8.backend}/state") == 1
        assert await env.xs0.read_int(f"{fe7.backend}/state") != 4
        # the crash did not stop the others: a later domain is still picked up
        fe6 = await start_guest(env, 6, "bystander", stack)
        with trio.fail_after(5):
            await fe6.connect(n)
            r = await fe6.submit(INQUIRY, data_in_len=96)
        assert r.rslt == 0
        # detach ends that backend; a new attach of the same device is served again
        with trio.fail_after(10):
            assert await detach(env.xs0, 6, 0)
        fe6b = await start_guest_again(env, 6, stack)
        with trio.fail_after(5):
            await fe6b.connect(n)
            r = await fe6b.submit(INQUIRY, data_in_len=96)
        assert r.rslt == 0
        n.cancel_scope.cancel()



def test_config_from_bridge_configuration():
    from types import SimpleNamespace

    from bridge.xen.runner import xen_config_from

    bridge_cfg = SimpleNamespace(xen=[
        SimpleNamespace(domain="domu1", devid=0, initiator="iqn.x:a", luns={0: "d"}),
        SimpleNamespace(domain="7", devid=2, initiator="iqn.x:b", luns={1: "d"})])
    cfg = xen_config_from(bridge_cfg)
    a, b = cfg.domains
    assert (a.name, a.domid, a.devid, a.initiator) == ("domu1", None, 0, "iqn.x:a")
    assert (b.name, b.domid, b.devid) == (None, 7, 2)
    assert a.matches(3, "domu1", 0) and not a.matches(3, "domu1", 1)
    assert b.matches(7, "whatever", 2) and not b.matches(8, "whatever", 2)


async def test_auto_attach_follows_a_rebooted_domain(env):
    """`xl reboot` recreates the domain under a new domid: the bridge attaches it again."""
    from bridge.xen.runner import XenBackendRunner

    config = XenConfig(domains=[XenDomainConfig(name="guest1", luns=(0,))], auto_attach=True)
    runner = XenBackendRunner(env.xs0, env.target, env.sim.platform, config)
    async with AsyncExitStack() as stack:
        n = await stack.enter_async_context(trio.open_nursery())
        await n.start(runner.run)
        env.sim.grant_table.add_domain(5, pages=256)
        env.xsd.introduce_domain(5, "guest1")
        xs5 = await stack.enter_async_context(open_xenstore(await env.xsd.connect(5)))
        fe = SimFrontend(env.sim, xs5, 5, 0)
        with trio.fail_after(5):
            await fe.connect(n)
            assert (await fe.submit(INQUIRY, data_in_len=96)).rslt == 0
        # reboot: domain 5 goes away (nodes reaped), the same name comes back as domain 9
        env.xsd.release_domain(5)
        env.sim.grant_table.add_domain(9, pages=256)
        env.xsd.introduce_domain(9, "guest1")
        xs9 = await stack.enter_async_context(open_xenstore(await env.xsd.connect(9)))
        fe9 = SimFrontend(env.sim, xs9, 9, 0)
        with trio.fail_after(5):
            await fe9.connect(n)
            assert (await fe9.submit(INQUIRY, data_in_len=96)).rslt == 0
        with trio.fail_after(5):
            while await env.xs0.exists(fe.backend):
                await trio.sleep(0.01)
        assert runner.auto_attached >= {(5, 0), (9, 0)}
        n.cancel_scope.cancel()
