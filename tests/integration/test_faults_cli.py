"""``vscsi-bridge fault`` against a real ``serve`` (not booted): add, list (table and
--json), status, remove, clear, exit statuses; the pytest plugin's add_fault."""

from __future__ import annotations

import json
from pathlib import Path

from bridge.control.pytest_plugin import start_bridge


def test_fault_cli_against_a_running_bridge(run_dir: Path) -> None:
    bridge = start_bridge(run_dir)
    try:
        r = bridge.cli("fault", "add", "disk0", "medium_error", "--op", "read", "--lba", "2048-2055")
        assert r.returncode == 0, r.stderr
        assert "medium_error" in r.stdout and "read, LBA 2048-2055" in r.stdout
        r = bridge.cli("fault", "add", "disk0", "hang", "--abort-fails", "--json")
        assert json.loads(r.stdout)["id"] == 2 and json.loads(r.stdout)["abort_fails"] is True
        assert bridge.add_fault("disk0", "busy", count=3, initiator="vm1.sock") == 3
        rules = json.loads(bridge.cli("fault", "list", "--json").stdout)
        assert [f["action"] for f in rules] == ["medium_error", "hang", "busy"]
        assert rules[2]["initiator"] == "iqn.2026-11.org.vscsi-bridge:vfio-user.vm1"
        table = bridge.cli("fault", "list").stdout
        assert table.splitlines()[0].split() == ["ID", "LU", "ACTION", "MATCHES", "MATCHED", "HITS",
                                                 "HUNG", "STATE"]
        assert "hang (abort fails)" in table
        assert "hang (abort fails)" in bridge.cli("status").stdout
        assert len(bridge.client.status()["faults"]) == 3

        r = bridge.cli("fault", "add", "disk0", "delay")
        assert r.returncode == 2 and "delay_ms: delay needs" in r.stderr, r.stderr
        r = bridge.cli("fault", "add", "nope", "busy")
        assert r.returncode == 1 and "no logical unit named 'nope'" in r.stderr
        r = bridge.cli("fault", "add", "disk0", "check_condition", "--sense", "zz")
        assert r.returncode == 2 and "--sense" in r.stderr
        r = bridge.cli("fault", "remove", "9")
        assert r.returncode == 1 and "no fault rule 9" in r.stderr

        r = bridge.cli("fault", "remove", "2")
        assert r.returncode == 0 and "removed fault rule 2" in r.stdout
        r = bridge.cli("fault", "clear")
        assert r.returncode == 0 and "removed 2 fault rule(s)" in r.stdout
        assert bridge.client.fault_list() == []
        assert "fault.add" in {m["name"] for m in bridge.client.rpc_list()}
    finally:
        code = bridge.stop()
    assert code == 0
    assert "fault rule 1 added" in bridge.log()
