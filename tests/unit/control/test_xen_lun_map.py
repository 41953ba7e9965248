"""lun.map / lun.unmap / pr.clear of the control plane reach a Xen guest (the simulated
platform and a xen-scsifront-like frontend, tests/unit/xen): the device appears and goes
through Reconfiguring, and the frontend's commands see the LU."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from bridge.control.jsonrpc import REFUSED, RpcError
from bridge.control.methods import Control, call
from bridge.scsi.logical_unit import LogicalUnitSpec
from tests.unit.xen.conftest import INITIATOR, env, running_backend  # noqa: F401
from tests.unit.xen.test_backend_io import clear_ua, read10


class XenOnlyHost:
    """The composition root's view for a bridge with one configured Xen guest."""

    def attachments(self) -> list[dict[str, Any]]:
        return [{"kind": "xen", "id": "xen:guest1.0", "domain": "guest1", "devid": 0,
                 "initiator": INITIATOR, "connected": None}]

    async def add_attachment(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("kind: not at run time")

    async def remove_attachment(self, key: str) -> dict[str, Any]:
        raise ValueError("Xen attachments cannot be removed at run time")

    def lu_spec(self, params: dict[str, Any]) -> LogicalUnitSpec:
        return LogicalUnitSpec(**params)


async def test_map_and_unmap_reach_the_xen_frontend(env, tmp_path):  # noqa: F811
    ctl = Control(env.target, XenOnlyHost(), str(tmp_path))
    async with running_backend(env) as (backend, fe, _):
        await call(ctl, "lu.add", {"name": "hot", "path": str(tmp_path / "hot.img"), "size": 1 << 20})
        r = await call(ctl, "lun.map", {"initiator": "xen:guest1.0", "lun": 2, "lu": "hot"})
        assert r["initiator"] == INITIATOR
        with trio.fail_after(5):
            while (0, 0, 2) not in fe.devices:
                await trio.sleep(0.005)
        await clear_ua(fe, (0, 0, 2))
        with trio.fail_after(5):
            resp = await fe.submit(read10(0, 8), (0, 0, 2), data_in_len=4096)
        assert resp.rslt == 0
        st = await call(ctl, "status", {})
        assert st["lun_maps"][INITIATOR] == {"0": "disk0", "2": "hot"}
        stats = await call(ctl, "stats", {})
        assert stats["logical_units"]["hot"]["commands"]["read"] == 1
        assert stats["logical_units"]["hot"]["bytes_read"] == 4096

        await call(ctl, "lun.unmap", {"initiator": INITIATOR, "lun": 2})
        with trio.fail_after(5):
            while (0, 0, 2) in fe.devices or (0, 0, 2) in backend.luns:
                await trio.sleep(0.005)
        with pytest.raises(RpcError) as e:
            await call(ctl, "attach.remove", {"id": "xen:guest1.0"})
        assert e.value.code == REFUSED and "cannot be removed at run time" in e.value.message
