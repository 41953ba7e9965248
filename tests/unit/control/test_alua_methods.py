"""alua.show / alua.set / port.down / port.up in process, and their CLI formatting."""

from __future__ import annotations

import argparse

from bridge.control import alua_cli
from bridge.control import jsonrpc as j
from bridge.control.methods import call
from bridge.scsi.alua import AccessState
from bridge.scsi.request import InitiatorPort, ScsiRequest, ServiceResponse

VM1 = "iqn.2026-11.org.vscsi-bridge:vfio-user.vm1"


async def test_show_set_and_ua(ctl):
    shown = await call(ctl, "alua.show", {})
    (g,) = shown["groups"]
    assert (g["name"], g["id"], g["state"]) == ("vfio-user.vm1", 1, "active/optimized")
    assert g["ports"][0]["relative_id"] == 1 and g["ports"][0]["nexuses"] == [VM1]
    r = await call(ctl, "alua.set", {"group": "1", "state": "standby"})
    assert r["groups"][0]["state"] == "standby"
    assert ctl.target.ports.group(1).state is AccessState.STANDBY
    pending = [asc for ini, _lu, q in ctl.target.unit_attentions.snapshot() if ini == VM1 for asc in q]
    assert (0x2A, 0x06) in pending


async def test_set_refusals(ctl):
    with __import__("pytest").raises(j.RpcError) as e:
        await call(ctl, "alua.set", {"group": "nope", "state": "standby"})
    assert e.value.code == j.NOT_FOUND
    with __import__("pytest").raises(j.RpcError) as e:
        await call(ctl, "alua.set", {"group": "1", "state": "sideways"})
    assert e.value.code == j.INVALID_PARAMS and "unknown access state" in e.value.message


async def test_port_down_up(ctl):
    r = await call(ctl, "port.down", {"port": "vfio-user.vm1"})
    assert r["groups"][0]["ports"][0]["up"] is False
    resp = await ctl.target.execute(ScsiRequest(lun=0, tag=1, cdb=bytes(6),
                                                initiator=InitiatorPort(VM1)))
    assert resp.response is ServiceResponse.PORT_DOWN
    r = await call(ctl, "port.up", {"port": "1"})
    assert r["groups"][0]["ports"][0]["up"] is True
    text = alua_cli.fmt_alua(r)
    assert "group vfio-user.vm1 (id 1): active/optimized" in text and "port 1 vfio-user.vm1 up" in text


def test_cli_parsing():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")

    def common(p, command):
        p.set_defaults(control_command=command)

    alua_cli.register(lambda name, help: sub.add_parser(name, help=help), common)
    args = parser.parse_args(["alua", "set", "left", "standby"])
    assert args.control_command(args)[:2] == ("alua.set", {"group": "left", "state": "standby"})
    args = parser.parse_args(["port", "down", "2"])
    assert args.control_command(args)[:2] == ("port.down", {"port": "2"})


def test_running_document_keeps_ports_groups_and_paths(tmp_path):
    from bridge.config import parse_config
    from bridge.control.running import document
    from bridge.scsi.target import Target

    ini = "iqn.2026-11.org.example:mp"
    doc = {"bridge": {"state_dir": str(tmp_path)},
           "lu": [{"name": "d", "path": "d.img", "size": "1MiB"}],
           "port_group": [{"name": "left", "id": 4}, {"name": "right", "id": 5, "state": "standby"}],
           "vfio_user": [{"socket": "a.sock", "initiator": ini, "port_group": "left", "luns": {"0": "d"}},
                         {"socket": "b.sock", "initiator": ini, "port_group": "right",
                          "relative_port": 9, "luns": {"0": "d"}}]}
    cfg = parse_config(doc, tmp_path)
    target = Target(cfg.lus, cfg.lun_maps(), ports=cfg.port_map())
    try:
        atts = [{"kind": "vfio_user", "socket": a.socket, "initiator": a.initiator,
                 "num_queues": a.num_queues, "queue_size": a.queue_size} for a in cfg.vfio_user]
        again = parse_config(document(target, atts, str(tmp_path), "info"), tmp_path)
    finally:
        target.close()
    assert [(a.initiator, a.relative_port, a.port_group) for a in again.vfio_user] == \
        [(a.initiator, a.relative_port, a.port_group) for a in cfg.vfio_user]
    assert [(g.name, g.id, g.state) for g in again.port_groups] == \
        [(g.name, g.id, g.state) for g in cfg.port_groups]
