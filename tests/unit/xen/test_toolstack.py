"""toolstack.py, the one writer of vscsi-devs nodes: attach, and hot-plug as one transaction."""

from bridge.xen import toolstack
from bridge.xen.toolstack import VDevSpec, attach, backend_path, read_devs, reconfigure
from bridge.xen.xenbus import XenbusState as S

from .conftest import DOMID


async def _attached(env, vdevs):
    env.xsd.introduce_domain(DOMID, "guest1")
    await attach(env.xs0, DOMID, 0, vdevs)
    be = backend_path(DOMID, 0)
    await env.xs0.write(f"{be}/state", str(int(S.CONNECTED)))
    return be


async def test_reconfigure_adds_with_the_devices_host_and_next_index(env):
    be = await _attached(env, [VDevSpec(0, "2:0:0:0")])
    assert await reconfigure(env.xs0, be, [(VDevSpec(3), True), (VDevSpec(4), True)])
    devs = {d.name: d for d in await read_devs(env.xs0, be)}
    assert (str(devs["dev-1"].vdev), devs["dev-1"].lun, devs["dev-1"].state) == ("2:0:0:3", 3, 1)
    assert (str(devs["dev-2"].vdev), devs["dev-2"].lun) == ("2:0:0:4", 4)
    assert await env.xs0.read_str(f"{be}/vscsi-devs/dev-2/p-devname") == "vscsi-bridge-lun4"
    assert await env.xs0.read_int(f"{be}/state") == S.RECONFIGURING


async def test_reconfigure_removes_live_entries_only(env):
    be = await _attached(env, [0, 1])
    await toolstack.set_dev_state(env.xs0, be, "dev-1", S.CLOSED)  # refused earlier
    assert not await reconfigure(env.xs0, be, [(VDevSpec(1), False)])
    assert await env.xs0.read_int(f"{be}/state") == S.CONNECTED  # nothing to do: no 7
    assert await reconfigure(env.xs0, be, [(VDevSpec(0), False)])
    assert [(d.name, d.state) for d in await read_devs(env.xs0, be)] == [
        ("dev-0", S.CLOSING), ("dev-1", S.CLOSED)]
    assert await env.xs0.read_int(f"{be}/state") == S.RECONFIGURING


async def test_adding_a_lun_already_offered_writes_nothing(env):
    be = await _attached(env, [0])
    assert not await toolstack.hotplug_lun(env.xs0, DOMID, 0, 0, add=True)
    assert [d.name for d in await read_devs(env.xs0, be)] == ["dev-0"]
    assert await env.xs0.read_int(f"{be}/state") == S.CONNECTED
