"""Fixtures: a simulated Xen machine (xenstored, grants, event channels) with the real target core."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio

from bridge.scsi.logical_unit import LogicalUnitSpec
from bridge.scsi.target import Target
from bridge.xen.backend import BackendConfig, VscsiBackend
from bridge.xen.toolstack import attach, backend_path
from bridge.xen.xenstore import XenStore, open_xenstore
from tests.xen_sim.platform import SimXen
from tests.xen_sim.xenstored import SimXenstored

from .frontend import SimFrontend

MiB = 1 << 20
DOMID = 5
INITIATOR = "iqn.2026-11.org.vscsi-bridge:xen.guest1.0"


def make_target(tmp_path, luns: dict[int, str] | None = None, extra: dict[str, str] | None = None
                ) -> Target:
    specs = [LogicalUnitSpec(name="disk0", path=str(tmp_path / "disk0.img"), size=4 * MiB),
             LogicalUnitSpec(name="disk1", path=str(tmp_path / "disk1.img"), size=2 * MiB),
             LogicalUnitSpec(name="disk2", path=str(tmp_path / "disk2.img"), size=1 * MiB)]
    maps = {INITIATOR: luns if luns is not None else {0: "disk0"}}
    for other in ("victim", "bystander", "other"):
        maps[f"iqn.2026-11.org.vscsi-bridge:xen.{other}.0"] = {0: "disk2"}
    maps.update({k: {0: v} for k, v in (extra or {}).items()})
    return Target(specs, maps)


@dataclass
class Env:
    sim: SimXen
    xsd: SimXenstored
    xs0: XenStore  # dom0's connection (toolstack + backend)
    target: Target
    nursery: trio.Nursery


@pytest.fixture
async def env(tmp_path, nursery):
    sim = SimXen()
    xsd = SimXenstored(nursery)
    target = make_target(tmp_path)
    async with open_xenstore(await xsd.connect(0)) as xs0:
        yield Env(sim, xsd, xs0, target, nursery)
    target.close()


async def wait_value(xs: XenStore, path: str, want: int, timeout: float = 5) -> None:
    """Wait (watching) until the node at path reads as the integer ``want``."""
    with trio.fail_after(timeout):
        async with xs.watch(path) as w:
            while await xs.read_int(path) != want:
                await w.wait()


@asynccontextmanager
async def running_backend(env: Env, domid: int = DOMID, devid: int = 0, luns=(0,),
                          name: str = "guest1", config: BackendConfig | None = None,
                          connect: bool = True):
    """Introduce a guest, attach a vscsi device, run its backend, connect a frontend."""
    if domid not in env.sim.grant_table.memory:
        env.sim.grant_table.add_domain(domid, pages=2048)
        env.xsd.introduce_domain(domid, name)
    await attach(env.xs0, domid, devid, list(luns))
    backend = VscsiBackend(env.xs0, env.sim.platform, env.target,
                           backend_path(domid, devid), config)
    async with trio.open_nursery() as n:
        n.start_soon(backend.run)
        async with open_xenstore(await env.xsd.connect(domid)) as xs_guest:
            fe = SimFrontend(env.sim, xs_guest, domid, devid)
            if connect:
                with trio.fail_after(5):
                    await fe.connect(n)
            try:
                yield backend, fe, n
            finally:
                n.cancel_scope.cancel()
