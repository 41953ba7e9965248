"""Configuration: valid files load; every error is one line naming the field, exit code 2."""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bridge.config import ConfigError, load_config, parse_config, parse_size

GOOD = """
[bridge]
state_dir = "run"
log_level = "debug"

[[lu]]
name = "disk0"
path = "disk0.img"
size = "64MiB"
block_size = 4096
wwn = "naa.6001405abcdef012"
serial = "SN-0001"

[[lu]]
name = "shared"
path = "/tmp/does-not-matter.img"
size = 1048576
read_only = true

[[vfio_user]]
socket = "vm1.sock"
initiator = "iqn.2026-11.org.example:vm1"
num_queues = 4
luns = { 0 = "disk0", 1 = "shared" }

[[xen]]
domain = "domu1"
devid = 0
luns = { 0 = "shared" }
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bridge.toml"
    p.write_text(text)
    return p


def test_good_config(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert [lu.name for lu in cfg.lus] == ["disk0", "shared"]
    assert cfg.lus[0].path == str(tmp_path / "disk0.img")
    assert cfg.lus[0].size == 64 << 20 and cfg.lus[0].block_size == 4096
    assert cfg.lus[1].read_only and cfg.lus[1].block_size == 512
    assert cfg.vfio_user[0].socket == "run/vm1.sock" or cfg.vfio_user[0].socket.endswith("vm1.sock")
    assert cfg.vfio_user[0].num_queues == 4
    assert cfg.xen[0].initiator == "iqn.2026-11.org.vscsi-bridge:xen.domu1.0"
    assert cfg.lun_maps() == {
        "iqn.2026-11.org.example:vm1": {0: "disk0", 1: "shared"},
        "iqn.2026-11.org.vscsi-bridge:xen.domu1.0": {0: "shared"},
    }


@pytest.mark.parametrize(
    "value,expected",
    [(4096, 4096), ("1GiB", 1 << 30), ("512M", 512 << 20), ("10", 10), ("2 T", 2 << 40), ("8KB", 8 << 10)],
)
def test_parse_size(value: object, expected: int) -> None:
    assert parse_size(value, "x") == expected


@pytest.mark.parametrize("value", ["1 parsec", -1, 0, True, 1.5, "G"])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ConfigError) as e:
        parse_size(value, "lu[0].size")
    assert e.value.field == "lu[0].size"


BASE_LU = {"name": "d", "path": "/tmp/x.img", "size": 4096}


@pytest.mark.parametrize(
    "doc,field",
    [
        ({}, "lu"),
        ({"lu": [{"path": "/x", "size": 512}]}, "lu[0].name"),
        ({"lu": [{"name": "d", "size": 512}]}, "lu[0].path"),
        ({"lu": [{**BASE_LU, "block_size": 1024}]}, "lu[0].block_size"),
        ({"lu": [{**BASE_LU, "block_size": "512"}]}, "lu[0].block_size"),
        ({"lu": [{**BASE_LU, "size": 1000}]}, "lu[0].size"),
        ({"lu": [{"name": "d", "path": "/nonexistent/x.img"}]}, "lu[0].path"),
        ({"lu": [{"name": "d", "path": "/tmp/vscsi-does-not-exist.img"}]}, "lu[0].size"),
        ({"lu": [{**BASE_LU, "wwn": "naa.5001"}]}, "lu[0].wwn"),
        ({"lu": [{**BASE_LU, "serial": "has space"}]}, "lu[0].serial"),
        ({"lu": [{**BASE_LU, "read_only": "yes"}]}, "lu[0].read_only"),
        ({"lu": [{**BASE_LU, "colour": "red"}]}, "lu[0].colour"),
        ({"lu": [BASE_LU, BASE_LU]}, "lu[1].name"),
        ({"lu": [BASE_LU], "vfio_user": [{"luns": {"0": "d"}}]}, "vfio_user[0].socket"),
        ({"lu": [BASE_LU], "vfio_user": [{"socket": "/s", "luns": {"0": "nope"}}]}, "vfio_user[0].luns.0"),
        ({"lu": [BASE_LU], "vfio_user": [{"socket": "/s", "luns": {"x": "d"}}]}, "vfio_user[0].luns.x"),
        ({"lu": [BASE_LU], "vfio_user": [{"socket": "/s", "luns": {"16384": "d"}}]}, "vfio_user[0].luns.16384"),
        ({"lu": [BASE_LU], "vfio_user": [{"socket": "/s", "num_queues": 0, "luns": {}}]}, "vfio_user[0].num_queues"),
        ({"lu": [BASE_LU], "vfio_user": [{"socket": "/s", "queue_size": 100, "luns": {}}]}, "vfio_user[0].queue_size"),
        ({"lu": [BASE_LU], "vfio_user": [{"socket": "/s", "initiator": "bob", "luns": {}}]}, "vfio_user[0].initiator"),
        ({"lu": [BASE_LU], "xen": [{"luns": {}}]}, "xen[0].domain"),
        ({"lu": [BASE_LU], "xen": [{"domain": 1, "devid": -1, "luns": {}}]}, "xen[0].devid"),
        ({"lu": [BASE_LU], "bridge": {"log_level": "loud"}}, "bridge.log_level"),
        ({"lu": [BASE_LU], "vfio_user": [{"socket": "/s", "luns": {}}], "extra": 1}, "extra"),
    ],
)
def test_errors_name_the_field(doc: dict, field: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(doc, tmp_path)
    assert e.value.field == field, str(e.value)


@pytest.mark.parametrize("lus,error", [
    ([BASE_LU, BASE_LU], "lu[1].name: duplicate logical unit name 'd'"),
    ([{**BASE_LU, "name": "x" * 65}], "lu[0].name: must be 1-64 characters of letters, digits and _ . : -"),
])
def test_logical_unit_name_errors(lus: list, error: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"lu": lus}, tmp_path)
    assert error in str(e.value)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge.cli", *args], capture_output=True, text=True, timeout=60)


def test_cli_bad_config_one_line_exit_2(tmp_path: Path) -> None:
    p = write(tmp_path, '[[lu]]\nname = "d"\npath = "x.img"\nsize = "12 furlongs"\n'
                        '[[vfio_user]]\nsocket = "/tmp/v.sock"\nluns = { 0 = "d" }\n')
    r = run_cli("serve", "--config", str(p))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "lu[0].size" in lines[0] and "Traceback" not in r.stderr


def test_cli_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    p = write(tmp_path, "[[lu]\n")
    r = run_cli("check-config", str(p))
    assert r.returncode == 2 and "not valid TOML" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("check-config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "no such file" in r.stderr


def test_cli_help() -> None:
    r = run_cli("--help")
    assert r.returncode == 0 and "serve" in r.stdout and "status" in r.stdout


def test_cli_check_config_describes(tmp_path: Path) -> None:
    no_xen = GOOD[: GOOD.index("[[xen]]")]
    r = run_cli("check-config", str(write(tmp_path, no_xen)))
    assert r.returncode == 0, r.stderr
    assert "LU disk0" in r.stdout and "iqn.2026-11.org.example:vm1" in r.stdout


def test_cli_damaged_reservation_state_one_line(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    (tmp_path / "d.img.pr.json").write_text('{"generation": 3, "registr')
    run = tempfile.mkdtemp(prefix="vscsi-", dir="/tmp")
    p = write(tmp_path, f'[bridge]\nstate_dir = "{run}"\n[[lu]]\nname = "d"\npath = "{img}"\nsize = 1048576\n'
                        '[[vfio_user]]\nsocket = "v.sock"\nluns = { 0 = "d" }\n')
    r = run_cli("serve", "--config", str(p))
    shutil.rmtree(run)
    assert r.returncode == 1
    assert "d.img.pr.json" in r.stderr and "refused" in r.stderr and "Traceback" not in r.stderr


def test_physical_block_size_512e_and_its_error(tmp_path):
    """512e (SBC-3 5.16.2): accepted as a power-of-two multiple of block_size, else named."""
    from bridge.config import ConfigError, load_config

    def cfg(extra: str):
        p = tmp_path / "b.toml"
        p.write_text(f'[[lu]]\nname = "d"\npath = "d.img"\nsize = "1MiB"\n{extra}\n'
                     '[[vfio_user]]\nsocket = "s.sock"\nluns = { 0 = "d" }\n')
        return load_config(str(p))

    assert cfg("physical_block_size = 4096").lus[0].physical_block_size == 4096
    with pytest.raises(ConfigError) as e:
        cfg("physical_block_size = 1536")
    assert "lu[0].physical_block_size" in str(e.value) and "power-of-two multiple" in str(e.value)


# -- target ports, port groups, one guest's paths (bridge/scsi/ports.py) --------------

def _two_paths(tmp_path, **extra):
    ini = "iqn.2026-11.org.example:vm1"
    doc = {"lu": [{"name": "a", "path": str(tmp_path / "a.img"), "size": 4096}],
           "vfio_user": [{"socket": str(tmp_path / "p1.sock"), "initiator": ini, "luns": {"0": "a"}},
                         {"socket": str(tmp_path / "p2.sock"), "initiator": ini, "luns": {"0": "a"}}],
           **extra}
    return ini, doc


def test_one_initiator_two_paths_gets_two_initiator_ports(tmp_path):
    ini, doc = _two_paths(tmp_path)
    cfg = parse_config(doc, tmp_path)
    a, b = cfg.vfio_user
    assert (a.initiator, b.initiator) == (f"{ini},i,0x000000000001", f"{ini},i,0x000000000002")
    assert (a.relative_port, b.relative_port) == (1, 2)
    assert (a.port_group, b.port_group) == ("vfio-user.p1", "vfio-user.p2")
    assert [(g.name, g.id) for g in cfg.port_groups] == [("vfio-user.p1", 1), ("vfio-user.p2", 2)]
    pm = cfg.port_map()
    assert pm.port_of_nexus(b.initiator).relative_id == 2
    assert set(cfg.lun_maps()) == {a.initiator, b.initiator}


def test_port_groups_declared_with_states(tmp_path):
    ini, doc = _two_paths(tmp_path, port_group=[
        {"name": "left", "id": 10, "state": "active/optimized", "preferred": True},
        {"name": "right", "state": "standby"}])
    doc["vfio_user"][0]["port_group"] = "left"
    doc["vfio_user"][1]["port_group"] = "right"
    doc["vfio_user"][1]["relative_port"] = 7
    cfg = parse_config(doc, tmp_path)
    groups = {g.name: g for g in cfg.port_groups}
    assert groups["left"].id == 10 and groups["left"].preferred
    assert groups["right"].id == 1 and groups["right"].state.label == "standby"
    assert [a.relative_port for a in cfg.vfio_user] == [1, 7]


@pytest.mark.parametrize("change,error", [
    (lambda d: d["vfio_user"][1].update(relative_port=0), "vfio_user[1].relative_port: must be between 1 and 65535"),
    (lambda d: d["vfio_user"][1].update(relative_port=1) or d["vfio_user"][0].update(relative_port=1),
     "vfio_user[1].relative_port: relative port 1 is also vfio_user[0]'s"),
    (lambda d: d.update(port_group=[{"name": "g", "state": "sideways"}]), "port_group[0].state: unknown access state"),
    (lambda d: d.update(port_group=[{"name": "g", "id": 2}, {"name": "h", "id": 2}]),
     "port_group[1].id: port group id 2 is used twice"),
    (lambda d: d.update(port_group=[{"name": "g"}, {"name": "g"}]),
     "port_group[1].name: port group 'g' defined twice"),
    (lambda d: d.update(port_group=[{"name": "a b"}]),
     "port_group[0].name: must be 1-64 characters of letters, digits and _ . : -"),
])
def test_port_configuration_errors(tmp_path, change, error):
    _ini, doc = _two_paths(tmp_path)
    change(doc)
    with pytest.raises(ConfigError) as e:
        parse_config(doc, tmp_path)
    assert error in str(e.value)


def test_doorbell_trap_or_poll(tmp_path):
    """[[vfio_user]] doorbell: how queue notifications arrive; anything else is named."""
    from bridge.config import ConfigError, load_config

    def cfg(extra: str):
        p = tmp_path / "b.toml"
        p.write_text('[[lu]]\nname = "d"\npath = "d.img"\nsize = "1MiB"\n'
                     f'[[vfio_user]]\nsocket = "s.sock"\nluns = {{ 0 = "d" }}\n{extra}\n')
        return load_config(str(p))

    assert cfg("").vfio_user[0].doorbell == "trap"
    assert cfg('doorbell = "poll"').vfio_user[0].doorbell == "poll"
    with pytest.raises(ConfigError) as e:
        cfg('doorbell = "ioeventfd"')
    assert "vfio_user[0].doorbell" in str(e.value) and "trap, poll" in str(e.value)
