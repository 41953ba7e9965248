"""The pytest plugin as a user loads it: its entry point, and a test of the user's own
using the ``vscsi_bridge`` fixture (loaded with -p, as the entry point does once installed)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_entry_point_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["pytest11"] == {"vscsi_bridge": "bridge.control.pytest_plugin"}


def test_a_users_test_with_the_fixture(tmp_path):
    (tmp_path / "test_users.py").write_text('''
def test_hot_add(vscsi_bridge):
    c = vscsi_bridge.client
    c.lu_add(name="extra", path=str(vscsi_bridge.directory / "extra.img"), size="1MiB")
    c.lun_map(initiator="vm1.sock", lun=1, lu="extra")
    assert c.status()["lun_maps"]["iqn.2026-11.org.vscsi-bridge:vfio-user.vm1"] == {"0": "disk0", "1": "extra"}
    r = vscsi_bridge.cli("lu", "list")
    assert r.returncode == 0 and "extra" in r.stdout

def test_factory(vscsi_bridge_factory):
    b = vscsi_bridge_factory({"lu": [{"name": "a", "path": "a.img", "size": 4096, "block_size": 4096}],
                              "vfio_user": [{"socket": "x.sock", "luns": {"3": "a"}}]})
    assert b.client.lu_list()[0]["block_size"] == 4096
''')
    installed = any(ep.name == "vscsi_bridge" for ep in entry_points(group="pytest11"))
    load = [] if installed else ["-p", "bridge.control.pytest_plugin"]  # not reinstalled yet
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", *load, "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 passed" in r.stdout
