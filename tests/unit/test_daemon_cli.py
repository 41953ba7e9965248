"""Issue 11: every start-up failure and configuration problem is one line naming the file,
socket, device or field and what to do; exit 2 for the configuration, 1 for the host;
no traceback. check-config lists every problem and prints the size actually served."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import bridge.service
from bridge import cli
from bridge.config import ConfigErrors, load_config, parse_config
from tests.unit.daemon_support import REPO, run_cli, workdir, write_config

P = "vscsi-bridge: "
CE = P + "configuration error: "


def one_line(r, rc: int) -> str:  # type: ignore[no-untyped-def]
    assert r.returncode == rc, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def errors_of(doc: dict, base: Path) -> list[str]:
    with pytest.raises(ConfigErrors) as e:
        parse_config(doc, base)
    return [str(err) for err in e.value.errors]


# --- start-up failures through the command line --------------------------------------


def test_socket_path_too_long_is_one_line_exit_2() -> None:
    with workdir() as d:
        long_dir = d / ("x" * 100)
        long_dir.mkdir()
        cfg = write_config(d, state_dir=str(long_dir))
        sock = long_dir / "vm.sock"
        n = len(os.fsencode(str(sock)))
        line = one_line(run_cli("serve", "--config", str(cfg)), 2)
        assert line == (f"{CE}vfio_user[0].socket: {sock} is {n} bytes, longer than the 107 a unix "
                        "socket path may have; use a shorter state_dir or socket name")


def test_socket_directory_missing_is_one_line_exit_2() -> None:
    with workdir() as d:
        cfg = write_config(d, '[[vfio_user]]\nsocket = "/tmp/vscsi-no-such-dir/vm.sock"\nluns = { 0 = "disk" }\n')
        line = one_line(run_cli("serve", "--config", str(cfg)), 2)
        assert line == (f"{CE}vfio_user[0].socket: directory /tmp/vscsi-no-such-dir does not exist; "
                        "create it or correct the path")


def test_socket_path_is_a_regular_file_is_one_line_exit_2() -> None:
    with workdir() as d:
        cfg = write_config(d, f'[[vfio_user]]\nsocket = "{d}/plain"\nluns = {{ 0 = "disk" }}\n')
        (d / "plain").write_text("keep me")
        line = one_line(run_cli("serve", "--config", str(cfg)), 2)
        assert line == (f"{CE}vfio_user[0].socket: {d}/plain exists and is not a socket; "
                        "remove it or choose another path")
        assert (d / "plain").read_text() == "keep me"


def test_xen_without_gntdev_is_one_line_exit_1(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    # In process, with the device path pointed somewhere that surely does not exist, so the
    # test means the same on a Xen dom0.
    monkeypatch.setattr(bridge.service, "XEN_GNTDEV", "/dev/xen/no-such-gntdev")
    with workdir() as d:
        cfg = write_config(d, '[[xen]]\ndomain = "domu1"\nluns = { 0 = "disk" }\n')
        assert cli.main(["serve", "--config", str(cfg)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == (f"{P}xen[0]: /dev/xen/no-such-gntdev does not exist: [[xen]] attachments "
                           "need a Xen dom0 with the xen-gntdev module loaded; remove the [[xen]] "
                           "sections on this host")
        assert not any("Traceback" in line for line in err)
        assert not (d / "run" / "vscsi-bridge.pid").read_text()  # lock released, PID cleared


def test_empty_image_is_one_line_exit_2() -> None:
    with workdir() as d:
        cfg = write_config(d, size=0)
        line = one_line(run_cli("serve", "--config", str(cfg)), 2)
        assert line == (f"{CE}lu[0].path: {d}/disk.img is 0 bytes, smaller than one 512-byte block; "
                        "give it a size or use another image")


def test_status_on_damaged_reservation_file_is_one_line_exit_1() -> None:
    with workdir() as d:
        cfg = write_config(d)
        (d / "disk.img.pr.json").write_text('{"generation": 3, "regis')
        line = one_line(run_cli("status", "--config", str(cfg)), 1)
        assert line.startswith(f"{P}persistent reservation state '{d}/disk.img.pr.json' refused: "
                               "not valid JSON (corrupt or truncated): ")
        assert line.endswith("; move it away or repair it to start")


def test_serve_without_config_refuses_instead_of_serving_a_demo() -> None:
    r = run_cli("serve")
    assert r.returncode == 2 and "one of the arguments --config/-c --demo is required" in r.stderr


# --- check-config: the cross-field checks, every error listed ------------------------


def test_two_lus_on_one_path(tmp_path: Path) -> None:
    lu = {"path": "same.img", "size": 4096}
    doc = {"lu": [{"name": "a", **lu}, {"name": "b", **lu}],
           "vfio_user": [{"socket": "/tmp/s.sock", "luns": {"0": "a", "1": "b"}}]}
    assert errors_of(doc, tmp_path) == [
        f"lu[1].path: {tmp_path}/same.img is also the image of lu[0]; one image can back only one logical unit"]


def test_path_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    doc = {"lu": [{"name": "a", "path": "dir"}], "vfio_user": [{"socket": "/tmp/s.sock", "luns": {"0": "a"}}]}
    assert errors_of(doc, tmp_path) == [
        f"lu[0].path: {tmp_path}/dir is a directory, not an image file or block device"]


def test_same_xen_device_twice(tmp_path: Path) -> None:
    doc = {"lu": [{"name": "a", "path": "a.img", "size": 4096}],
           "xen": [{"domain": "d1", "luns": {"0": "a"}},
                   {"domain": "d1", "devid": 0, "initiator": "iqn.2026-11.org.example:x", "luns": {}}]}
    assert errors_of(doc, tmp_path) == [
        "xen[1].devid: domain d1 vscsi device 0 is also configured by xen[0]"]


@pytest.mark.parametrize("key", ["00", "1_000", "+1", " 1"])
def test_lun_keys_are_plain_decimal(key: str, tmp_path: Path) -> None:
    doc = {"lu": [{"name": "a", "path": "a.img", "size": 4096}],
           "vfio_user": [{"socket": "/tmp/s.sock", "luns": {"0": "a", key: "a"}}]}
    assert errors_of(doc, tmp_path) == [
        f"vfio_user[0].luns.{key}: LUN must be a decimal integer without leading zeros, signs or underscores"]


def test_missing_image_directory(tmp_path: Path) -> None:
    doc = {"lu": [{"name": "a", "path": "nodir/a.img", "size": 4096}],
           "vfio_user": [{"socket": "/tmp/s.sock", "luns": {"0": "a"}}]}
    assert errors_of(doc, tmp_path) == [
        f"lu[0].path: directory {tmp_path}/nodir does not exist; create it or correct the path"]


def test_no_attachments(tmp_path: Path) -> None:
    doc = {"lu": [{"name": "a", "path": "a.img", "size": 4096}]}
    assert errors_of(doc, tmp_path) == [
        "vfio_user: nothing to serve: add a [[vfio_user]] or [[xen]] attachment"]


def test_duplicate_initiator_names_both_attachments(tmp_path: Path) -> None:
    ini = "iqn.2026-11.org.example:same"
    doc = {"lu": [{"name": "a", "path": "a.img", "size": 4096}],
           "vfio_user": [{"socket": "/tmp/s.sock", "initiator": ini, "luns": {"0": "a"}}],
           "xen": [{"domain": "d1", "initiator": ini, "luns": {"0": "a"}}]}
    assert errors_of(doc, tmp_path) == [
        f"xen[0].initiator: {ini} is also the initiator of vfio_user[0]; one initiator name on "
        "several attachments must be one guest's paths (all vfio_user, or one Xen domain's devices)"]


def test_check_config_lists_every_error_one_per_line() -> None:
    with workdir() as d:
        cfg = d / "bad.toml"
        cfg.write_text('[bridge]\nlog_level = "loud"\n'
                       '[[lu]]\nname = "a"\npath = "a.img"\nblock_size = 1000\nsize = 4096\n'
                       '[[vfio_user]]\nsocket = "/tmp/s.sock"\nnum_queues = 0\nluns = { 0 = "b" }\n')
        r = run_cli("check-config", str(cfg))
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines() == [
            f"{CE}bridge.log_level: must be one of debug, info, warning, error",
            f"{CE}lu[0].block_size: must be 512 or 4096",
            f"{CE}vfio_user[0].num_queues: must be between 1 and 64",
            f"{CE}vfio_user[0].luns.0: no logical unit named 'b'",
        ]


def test_check_config_prints_the_served_size_not_the_configured_one() -> None:
    with workdir() as d:
        cfg = write_config(d, size=256 << 20, lu_extra='size = "64MiB"')
        r = run_cli("check-config", str(cfg))
        assert r.returncode == 0, r.stderr
        assert f"LU disk: {d}/disk.img (256 MiB served, 512-byte blocks)" in r.stdout.splitlines()
        assert r.stderr.strip().splitlines() == [
            f"{P}warning: lu[0].size: 64 MiB ignored: {d}/disk.img exists and is 256 MiB "
            "(an existing image is never resized)"]


def test_check_config_warns_about_a_partial_block() -> None:
    with workdir() as d:
        cfg = write_config(d, size=1000)
        r = run_cli("check-config", str(cfg))
        assert r.returncode == 0, r.stderr
        assert f"LU disk: {d}/disk.img (512 bytes served, 512-byte blocks)" in r.stdout
        assert r.stderr.strip() == (f"{P}warning: lu[0].path: {d}/disk.img is 1000 bytes, not a multiple "
                                    "of 512: 1 block (512 bytes) served, the last 488 bytes are not")


def test_relative_state_dir_is_taken_from_the_configuration_file(monkeypatch: pytest.MonkeyPatch) -> None:
    with workdir() as d:
        cfg = write_config(d, state_dir="state")
        monkeypatch.chdir("/")
        config = load_config(cfg)
        assert config.state_dir == str(d / "state")
        assert config.vfio_user[0].socket == str(d / "state" / "vm.sock")


# --- package-facing command line ------------------------------------------------------


def test_version() -> None:
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("vscsi-bridge 0.1.0")


def test_every_argument_has_help() -> None:
    for args in (["check-config", "-h"], ["xen", "attach", "-h"], ["xen", "detach", "-h"],
                 ["serve", "-h"], ["qemu-args", "-h"]):
        r = run_cli(*args)
        assert r.returncode == 0, r.stderr
    assert "TOML configuration file to check" in run_cli("check-config", "-h").stdout
    attach = run_cli("xen", "attach", "-h").stdout
    assert "by name" in attach and "vhost" in attach and "0:0:L//256:L%256" in attach


def test_qemu_args_prints_the_shipped_options_for_a_socket() -> None:
    with workdir() as d:
        cfg = write_config(d)
        r = run_cli("qemu-args", "--config", str(cfg), "--mem", "1G")
        assert r.returncode == 0, r.stderr
        sock = d / "run" / "vm.sock"
        assert r.stdout.splitlines() == [
            "-object memory-backend-memfd,id=mem0,size=1G,share=on \\",
            "-machine memory-backend=mem0 \\",
            "-device '{\"driver\":\"vfio-user-pci\",\"id\":\"vscsi0\",\"socket\":{\"path\":\"" + str(sock)
            + "\",\"type\":\"unix\"}}'",
        ]
        # The printed options are the ones the booted tests run (same file).
        assert "share=on" in (REPO / "qemu-configs" / "vfio-user.args").read_text()
