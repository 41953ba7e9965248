"""The control CLI against a real ``vscsi-bridge serve`` subprocess (no guest booted):
every subcommand, human output and --json, exit statuses, the offline status fallback."""

from __future__ import annotations

import json
import subprocess
import sys

from bridge.config import load_config
from bridge.control.pytest_plugin import vscsi_bridge, vscsi_bridge_factory  # noqa: F401

VM1 = "iqn.2026-11.org.vscsi-bridge:vfio-user.vm1"


def ok(bridge, *args):
    r = bridge.cli(*args)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


def js(bridge, *args):
    return json.loads(ok(bridge, *args, "--json"))


def fails(bridge, code, *args, words=""):
    r = bridge.cli(*args)
    assert r.returncode == code, (args, r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vscsi-bridge: "), r.stderr
    assert words in r.stderr, r.stderr
    return r.stderr


def test_every_subcommand(vscsi_bridge):  # noqa: F811
    b = vscsi_bridge
    img = b.directory / "new.img"
    out = ok(b, "lu", "add", "new", str(img), "--size", "8MiB")
    assert "new" in out and "8 MiB" in out and "WWN" in out
    assert js(b, "lu", "list")[1]["size"] == 8 << 20
    assert "new" in ok(b, "lu", "list")
    assert ok(b, "lun", "map", "vm1.sock", "1", "new").strip() == f"{VM1} LUN 1 -> new"
    assert js(b, "lu", "resize", "new", "16MiB")["size"] == 16 << 20
    fails(b, 1, "lu", "resize", "new", "4MiB", words="lu resize: size: 4194304 is smaller")
    assert "16 MiB -> 4 MiB" in ok(b, "lu", "resize", "new", "4MiB", "--force")
    fails(b, 1, "lu", "remove", "new", words="is mapped")
    a = js(b, "attach", "add", "vm2.sock", "--lun", "0=new", "--num-queues", "1")
    assert a["luns"] == {"0": "new"} and a["num_queues"] == 1 and a["connected"] is False
    assert "vm2.sock" in ok(b, "attach", "list")
    st = js(b, "status")
    assert {x["socket"].rsplit("/", 1)[1] for x in st["attachments"]} == {"vm1.sock", "vm2.sock"}
    assert st["lun_maps"][VM1] == {"0": "disk0", "1": "new"}
    assert "CONNECTED" in ok(b, "status")
    assert "READS" in ok(b, "stats") and "logical_units" in js(b, "stats")
    assert ok(b, "stats", "--reset").strip() == "statistics reset"
    assert js(b, "pr", "show", "new")["new"]["generation"] == 0
    assert "GENERATION" in ok(b, "pr", "show")
    assert js(b, "pr", "clear", "new")["generation"] == 1
    assert ok(b, "log-level", "debug").strip() == "debug"
    assert js(b, "log-level")["level"] == "debug"
    saved = b.directory / "saved.toml"
    assert ok(b, "save-config", str(saved)).strip() == f"wrote {saved}"
    check = subprocess.run([sys.executable, "-m", "bridge.cli", "check-config", str(saved)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    cfg = load_config(saved)
    assert {v.socket.rsplit("/", 1)[1]: v.luns for v in cfg.vfio_user} == \
        {"vm1.sock": {0: "disk0", 1: "new"}, "vm2.sock": {0: "new"}}
    assert "removed" in ok(b, "attach", "remove", "vm2.sock")
    r = js(b, "lu", "remove", "new", "--force")
    assert r["unmapped"] == [{"initiator": VM1, "lun": 1}]
    assert [lu["name"] for lu in js(b, "lu", "list")] == ["disk0"]
    # save-config without a path rewrites the file serve was started with
    assert js(b, "save-config")["path"] == str(b.config_path)
    assert [lu.name for lu in load_config(b.config_path).lus] == ["disk0"]
    assert b.proc.poll() is None


def test_errors_and_exit_statuses(vscsi_bridge):  # noqa: F811
    b = vscsi_bridge
    fails(b, 1, "lu", "remove", "nope", words="lu remove: no logical unit named 'nope'")
    fails(b, 1, "lun", "unmap", VM1, "7", words="has no LUN 7")
    fails(b, 1, "lun", "map", "nobody", "1", "disk0", words="no attachment")
    fails(b, 2, "lu", "add", "x", str(b.directory / "missing.img"), words="size: is required")
    fails(b, 2, "attach", "add", "z.sock", "--lun", "zero", words="must be LUN=LU_NAME")
    fails(b, 2, "attach", "add", "z.sock", "--queue-size", "3", words="queue_size")
    fails(b, 1, "pr", "clear", "nope", words="no logical unit")
    r = subprocess.run([sys.executable, "-m", "bridge.cli", "lu", "add"], capture_output=True, text=True)
    assert r.returncode == 2  # argparse usage


def test_no_bridge_running(vscsi_bridge):  # noqa: F811
    b = vscsi_bridge
    b.stop()
    r = b.cli("lu", "list")
    assert r.returncode == 1 and "no bridge answers on" in r.stderr
    # status falls back to the configuration file and the saved state
    r = subprocess.run([sys.executable, "-m", "bridge.cli", "status", "--config", str(b.config_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "no bridge answers" in r.stderr
    assert json.loads(r.stdout)["initiators"][VM1]["luns"] == {"0": "disk0"}
    # and finds the socket from the configuration's state_dir while it runs
    b2_status = subprocess.run([sys.executable, "-m", "bridge.cli", "status", "-c", "/nonexistent.toml"],
                               capture_output=True, text=True)
    assert b2_status.returncode == 2 and "configuration error" in b2_status.stderr


def test_status_by_config_file(vscsi_bridge):  # noqa: F811
    b = vscsi_bridge
    r = subprocess.run([sys.executable, "-m", "bridge.cli", "status", "-c", str(b.config_path), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["control_socket"] == b.control_socket
