"""Every control method in process (methods.call on a real Target and Attachments)."""

from __future__ import annotations

import os

import pytest

from bridge.config import load_config
from bridge.control import jsonrpc as j
from bridge.control.methods import METHODS, call
from bridge.scsi.events import CapacityChanged, LunAdded, LunRemoved

VM1 = "iqn.2026-11.org.vscsi-bridge:vfio-user.vm1"


async def refused(ctl, method, params, code=j.REFUSED, words=""):
    with pytest.raises(j.RpcError) as e:
        await call(ctl, method, params)
    assert e.value.code == code, e.value.message
    assert words in e.value.message
    return e.value.message


async def test_lu_lifecycle_and_events(ctl, run_dir):
    events = []
    ctl.target.subscribe(events.append)
    lu = await call(ctl, "lu.add", {"name": "new", "path": "new.img", "size": "2MiB"})
    assert lu["size"] == 2 << 20 and lu["path"] == str(run_dir / "new.img") and lu["mapped"] == []
    assert os.stat(run_dir / "new.img").st_blocks == 0  # sparse
    await refused(ctl, "lu.add", {"name": "new", "path": "x.img", "size": 512}, words="exists")
    await refused(ctl, "lu.add", {"name": "x", "path": "missing.img"}, j.INVALID_PARAMS,
                  "size: is required")
    await refused(ctl, "lu.add", {"name": "x", "path": "x.img", "size": 1000}, j.INVALID_PARAMS,
                  "size: must be a multiple")
    await refused(ctl, "lu.add", {"name": "x y", "path": "x.img", "size": 512}, j.INVALID_PARAMS, "name")
    await refused(ctl, "lu.add", {"name": "twin", "path": str(run_dir / "disk0.img")},
                  words="is the image of logical unit 'disk0'")
    m = await call(ctl, "lun.map", {"initiator": "vm1.sock", "lun": 5, "lu": "new"})
    assert m == {"initiator": VM1, "lun": 5, "lu": "new"}
    await refused(ctl, "lun.map", {"initiator": VM1, "lun": 5, "lu": "disk1"}, words="unmap it first")
    await refused(ctl, "lun.map", {"initiator": "nobody", "lun": 1, "lu": "new"}, j.NOT_FOUND)
    await refused(ctl, "lun.map", {"initiator": VM1, "lun": 99999, "lu": "new"}, j.INVALID_PARAMS)
    r = await call(ctl, "lu.resize", {"name": "new", "size": "4MiB"})
    assert (r["old_size"], r["size"]) == (2 << 20, 4 << 20)
    await refused(ctl, "lu.resize", {"name": "new", "size": "1MiB"}, words="use force")
    assert (await call(ctl, "lu.resize", {"name": "new", "size": "1MiB", "force": True}))["size"] == 1 << 20
    await refused(ctl, "lu.resize", {"name": "new", "size": 1000}, j.INVALID_PARAMS, "multiple")
    await refused(ctl, "lu.resize", {"name": "new", "size": "lots"}, j.INVALID_PARAMS, "size")
    await refused(ctl, "lu.remove", {"name": "new"}, words="is mapped")
    await call(ctl, "lun.unmap", {"initiator": VM1, "lun": 5})
    await refused(ctl, "lun.unmap", {"initiator": VM1, "lun": 5}, j.NOT_FOUND)
    assert (await call(ctl, "lu.remove", {"name": "new"}))["unmapped"] == []
    await refused(ctl, "lu.remove", {"name": "new"}, j.NOT_FOUND)
    assert events == [LunAdded(VM1, 5), CapacityChanged(VM1, 5), CapacityChanged(VM1, 5),
                      LunRemoved(VM1, 5)]


async def test_lu_remove_force_unmaps(ctl):
    await call(ctl, "lun.map", {"initiator": VM1, "lun": 1, "lu": "disk1"})
    r = await call(ctl, "lu.remove", {"name": "disk1", "force": True})
    assert r["unmapped"] == [{"initiator": VM1, "lun": 1}]
    assert [lu["name"] for lu in await call(ctl, "lu.list", {})] == ["disk0"]


async def test_attachments(ctl, run_dir):
    a = await call(ctl, "attach.add", {"kind": "vfio_user", "socket": "vm2.sock",
                                       "luns": {"0": "disk1", "3": "disk0"}})
    assert a["socket"] == str(run_dir / "vm2.sock") and a["connected"] is False
    assert a["luns"] == {"0": "disk1", "3": "disk0"}
    assert os.path.exists(run_dir / "vm2.sock")
    await refused(ctl, "attach.add", {"kind": "vfio_user", "socket": "vm2.sock"}, j.INVALID_PARAMS,
                  "already served")
    await refused(ctl, "attach.add", {"kind": "vfio_user", "socket": "x.sock", "queue_size": 3},
                  j.INVALID_PARAMS, "queue_size")
    await refused(ctl, "attach.add", {"kind": "xen", "domain": "d"}, j.INVALID_PARAMS, "only vfio_user")
    await refused(ctl, "attach.add", {"kind": "vfio_user", "socket": "y.sock", "luns": {"0": "nope"}},
                  j.NOT_FOUND)
    assert len(await call(ctl, "attach.list", {})) == 2
    await call(ctl, "attach.remove", {"id": "vm2.sock"})
    assert not os.path.exists(run_dir / "vm2.sock")
    assert "iqn.2026-11.org.vscsi-bridge:vfio-user.vm2" not in ctl.target.lun_maps() or \
        not ctl.target.lun_maps()["iqn.2026-11.org.vscsi-bridge:vfio-user.vm2"]
    await refused(ctl, "attach.remove", {"id": "vm2.sock"}, j.NOT_FOUND)
    again = await call(ctl, "attach.add", {"kind": "vfio_user", "socket": "vm2.sock"})
    assert again["luns"] == {}  # the same socket and initiator again, without the old maps
    await refused(ctl, "attach.add", {"kind": "vfio_user", "socket": "vm3.sock",
                                      "initiator": VM1}, j.INVALID_PARAMS, "already used")


async def test_status_stats_pr_log(ctl):
    st = await call(ctl, "status", {})
    assert st["attachments"][0]["luns"] == {"0": "disk0"} and VM1 in st["initiators"]
    assert st["reservations"]["disk0"]["generation"] == 0
    ctl.target.unit_attentions.establish(VM1, "disk0", (0x2A, 0x09))
    st = await call(ctl, "status", {})
    assert {"initiator": VM1, "lu": "disk0", "pending": ["29h/01h", "2Ah/09h"]} in st["unit_attentions"]
    s = await call(ctl, "stats", {})
    assert s["logical_units"] == {} and len(s["histogram_bounds_us"]) == 24
    assert (await call(ctl, "stats.reset", {}))["since"] >= s["since"]
    pr = await call(ctl, "pr.show", {})
    assert set(pr) == {"disk0", "disk1"} and pr["disk0"]["registrants"] == []
    assert (await call(ctl, "pr.clear", {"lu": "disk0"}))["generation"] == 1
    await refused(ctl, "pr.show", {"lu": "nope"}, j.NOT_FOUND)
    assert (await call(ctl, "log.level", {"level": "debug"})) == {"level": "debug"}
    assert (await call(ctl, "log.level", {})) == {"level": "debug"}
    await refused(ctl, "log.level", {"level": "loud"}, j.INVALID_PARAMS)
    await call(ctl, "log.level", {"level": "info"})
    v = await call(ctl, "bridge.version", {})
    assert v["pid"] == os.getpid()
    names = {m["name"] for m in await call(ctl, "rpc.list", {})}
    assert names == set(METHODS)


async def test_config_save_round_trip(ctl, run_dir):
    await call(ctl, "lu.add", {"name": "new", "path": str(run_dir / "new.img"), "size": 1 << 20,
                               "block_size": 4096, "read_only": False,
                               "serial": "SER-1", "wwn": "naa.6001405" + "0" * 25})
    await call(ctl, "lun.map", {"initiator": VM1, "lun": 2, "lu": "new"})
    r = await call(ctl, "config.save", {"path": "saved.toml"})
    assert r["path"] == str(run_dir / "saved.toml")
    cfg = load_config(r["path"])
    assert [lu.name for lu in cfg.lus] == ["disk0", "disk1", "new"]
    assert cfg.lus[2].block_size == 4096 and cfg.lus[2].serial == "SER-1"
    assert cfg.vfio_user[0].luns == {0: "disk0", 2: "new"}
    assert cfg.state_dir == str(run_dir)
    assert (await call(ctl, "bridge.config", {}))["vfio_user"][0]["luns"] == {"0": "disk0", "2": "new"}


def _wrong_value(p: j.Param):
    for candidate in ("text", 7, True, {"a": 1}, [1]):
        if not any(isinstance(candidate, t) and not (isinstance(candidate, bool) and t is not bool)
                   for t in p.types):
            return candidate
    raise AssertionError(p)


@pytest.mark.parametrize("name", sorted(METHODS))
async def test_every_method_refuses_wrong_types_and_unknown_params(ctl, name):
    m = METHODS[name]
    valid = {p.name: ("disk0" if str in p.types else 0 if int in p.types else False
                      if bool in p.types else {}) for p in m.params if p.required}
    for p in m.params:
        bad = {**valid, p.name: _wrong_value(p)}
        msg = await refused(ctl, name, bad, j.INVALID_PARAMS)
        assert msg.startswith(p.name + ":")
    await refused(ctl, name, {**valid, "zzz": 1}, j.INVALID_PARAMS, "unknown parameter 'zzz'")
    for p in m.params:
        if p.required:
            await refused(ctl, name, {k: v for k, v in valid.items() if k != p.name},
                          j.INVALID_PARAMS, f"{p.name}: is required")
