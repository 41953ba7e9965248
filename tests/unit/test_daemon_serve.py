"""Issue 11: the bridge as a well-behaved service process.

One instance per state directory, sockets never unlinked from under a live bridge,
QEMU-compatible image locks, socket permissions, sd_notify, SIGHUP, logs naming the
connection. Each test runs real ``serve`` processes (not booted guests)."""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.daemon_support import Bridge, run_cli, vfio_user_version, workdir, write_config

P = "vscsi-bridge: "
QEMU_TREE = Path(os.environ.get("VSCSI_CACHE") or Path.home() / ".cache" / "vscsi-bridge") / "bin" / ".qemu-tree"


def test_second_serve_on_one_configuration_fails_naming_the_pid() -> None:
    with workdir() as d:
        cfg = write_config(d)
        sock = d / "run" / "vm.sock"
        with Bridge(cfg) as first:
            r = run_cli("serve", "--config", str(cfg))
            assert r.returncode == 1 and "Traceback" not in r.stderr
            assert r.stderr.strip().splitlines()[-1] == (
                f"{P}another vscsi-bridge (PID {first.proc.pid}) is already serving state directory "
                f"{d}/run (lock {d}/run/vscsi-bridge.pid); stop it first")
            # The first bridge's socket is still there and still answers.
            assert stat.S_ISSOCK(os.lstat(sock).st_mode)
            assert vfio_user_version(sock)["max_msg_fds"] > 0
            assert first.proc.poll() is None
        assert not sock.exists()  # removed by the bridge that made it, when it stopped


def test_a_live_socket_of_another_bridge_is_never_unlinked() -> None:
    # Two configurations (two state directories) naming one socket path.
    with workdir() as d:
        shared = d / "shared.sock"
        body = f'[[vfio_user]]\nsocket = "{shared}"\nluns = {{ 0 = "disk" }}\n'
        cfg1 = write_config(d, body, name="one.toml", image="one.img", state_dir="run1")
        cfg2 = write_config(d, body, name="two.toml", image="two.img", state_dir="run2")
        with Bridge(cfg1):
            inode = os.lstat(shared).st_ino
            r = run_cli("serve", "--config", str(cfg2))
            assert r.returncode == 1
            assert r.stderr.strip().splitlines()[-1] == (
                f"{P}socket {shared}: another process is listening on it; stop it or choose another socket path")
            assert os.lstat(shared).st_ino == inode
            vfio_user_version(shared)
        # A socket left by a killed bridge is stale: the next start replaces it.
        killed = Bridge(cfg2).wait_ready()
        killed.proc.kill()
        killed.stop()
        assert stat.S_ISSOCK(os.lstat(shared).st_mode)
        with Bridge(cfg1):
            vfio_user_version(shared)


def test_two_bridges_cannot_both_write_one_image() -> None:
    with workdir() as d:
        cfg1 = write_config(d, name="one.toml", state_dir="run1")
        cfg2 = write_config(d, '[[vfio_user]]\nsocket = "b.sock"\nluns = { 0 = "disk" }\n',
                            name="two.toml", state_dir="run2")
        with Bridge(cfg1):
            r = run_cli("serve", "--config", str(cfg2))
            assert r.returncode == 1 and "Traceback" not in r.stderr
            assert r.stderr.strip().splitlines()[-1] == (
                f"{P}image {d}/disk.img: in use (another process does not share \"write\": a QEMU, "
                "qemu-img or another bridge has it open); stop that process, or set share_rw = true "
                "on the LU if both may write it (cluster file system), or locking = false to take no locks")
            assert not (d / "run2" / "b.sock").exists()


def test_share_rw_and_read_only_lus_may_be_shared() -> None:
    with workdir() as d:
        for extra, label in (("share_rw = true", "rw"), ("read_only = true", "ro")):
            cfg1 = write_config(d, name=f"{label}1.toml", state_dir=f"{label}1", lu_extra=extra)
            cfg2 = write_config(d, name=f"{label}2.toml", state_dir=f"{label}2", lu_extra=extra)
            with Bridge(cfg1), Bridge(cfg2):
                pass
        # A writer is refused while a read-only bridge has the image.
        cfg_ro = write_config(d, name="ro.toml", state_dir="ro", lu_extra="read_only = true")
        cfg_rw = write_config(d, name="w.toml", state_dir="w")
        with Bridge(cfg_ro):
            r = run_cli("serve", "--config", str(cfg_rw))
            assert r.returncode == 1 and "in use (another process does not share \"write\"" in r.stderr


def _qemu_tool(name: str) -> list[str]:
    """A QEMU tool from the images cache's trixie tree, run through that tree's loader."""
    if not QEMU_TREE.exists():
        pytest.fail(f"{QEMU_TREE} missing: run images/build-qemu.sh (QEMU 11 with qemu-img/qemu-io) first")
    root = Path(QEMU_TREE.read_text().strip()) / "root"
    libs = f"{root}/usr/lib/x86_64-linux-gnu:{root}/lib/x86_64-linux-gnu"
    return [f"{root}/usr/lib64/ld-linux-x86-64.so.2", "--library-path", libs, f"{root}/usr/bin/{name}"]


def test_bridge_and_qemu_exclude_each_other() -> None:
    with workdir() as d:
        cfg = write_config(d)
        img = str(d / "disk.img")
        with Bridge(cfg):
            r = subprocess.run([*_qemu_tool("qemu-io"), "-f", "raw", "-c", "write 0 512", img],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode != 0
            assert "Failed to get \"write\" lock" in r.stderr, r.stderr
            assert (d / "disk.img").read_bytes()[:512] == bytes(512)
        # QEMU first (qemu-io keeps the image open read-write until its stdin closes).
        qio = subprocess.Popen([*_qemu_tool("qemu-io"), "-f", "raw", img], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 30
            while "201" not in Path("/proc/locks").read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            r = run_cli("serve", "--config", str(cfg))
            assert r.returncode == 1
            assert r.stderr.strip().splitlines()[-1].startswith(f"{P}image {img}: in use (")
        finally:
            qio.communicate("quit\n", timeout=30)
        with Bridge(cfg):  # and once QEMU is gone, the bridge starts
            pass


def test_socket_mode_owner_group_and_a_non_root_client() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root: it checks that another user can or cannot connect")
    nobody = pwd.getpwnam("nobody")
    with workdir() as d:
        os.chmod(d, 0o755)
        default = write_config(d, name="default.toml", image="a.img", state_dir="run-a")
        with Bridge(default):
            sock = d / "run-a" / "vm.sock"
            st = os.stat(sock)
            assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
            assert stat.S_IMODE(os.stat(d / "run-a").st_mode) == 0o700
            assert _connect_as(nobody.pw_uid, nobody.pw_gid, sock) == "EACCES"
        shared = write_config(d, name="shared.toml", image="b.img", state_dir="run-b",
                              extra_bridge=f'socket_mode = "0660"\nsocket_group = {nobody.pw_gid}')
        with Bridge(shared):
            sock = d / "run-b" / "vm.sock"
            st = os.stat(sock)
            assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == nobody.pw_gid
            assert stat.S_IMODE(os.stat(d / "run-b").st_mode) == 0o711
            assert _connect_as(nobody.pw_uid, nobody.pw_gid, sock) == "connected"


def _connect_as(uid: int, gid: int, path: Path) -> str:
    code = ("import os, socket, sys\n"
            f"os.setgroups([]); os.setgid({gid}); os.setuid({uid})\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n"
            f"    s.connect({str(path)!r}); print('connected')\n"
            "except PermissionError:\n"
            "    print('EACCES')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_sd_notify_ready_status_and_stopping() -> None:
    with workdir() as d:
        cfg = write_config(d)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(str(d / "notify"))
        listener.settimeout(30)
        try:
            bridge = Bridge(cfg, env={"NOTIFY_SOCKET": str(d / "notify")}).wait_ready()
            ready = listener.recv(4096).decode().split("\n")
            assert "READY=1" in ready
            assert "STATUS=serving 1 LUs on 1 vfio-user sockets" in ready
            assert f"MAINPID={bridge.proc.pid}" in ready
            assert (d / "run" / "vm.sock").exists()  # READY only once every socket listens
            assert bridge.stop() == 0
            assert listener.recv(4096).decode().split("\n") == ["STOPPING=1", "STATUS=stopping"]
        finally:
            listener.close()


def test_sighup_is_logged_and_does_not_stop_the_bridge() -> None:
    with workdir() as d:
        cfg = write_config(d)
        sock = d / "run" / "vm.sock"
        bridge = Bridge(cfg).wait_ready()
        try:
            bridge.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while "SIGHUP" not in bridge.stderr() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "SIGHUP: reload not supported yet; still serving the configuration loaded at start" \
                in bridge.stderr()
            assert bridge.proc.poll() is None
            vfio_user_version(sock)
        finally:
            rc = bridge.stop()
        assert rc == 0 and not sock.exists()


def test_connection_log_lines_name_socket_and_initiator_text_and_json() -> None:
    with workdir() as d:
        cfg = write_config(d)
        sock = d / "run" / "vm.sock"
        ini = "iqn.2026-11.org.vscsi-bridge:vfio-user.vm"
        with Bridge(cfg, "--log-level", "debug") as bridge:
            vfio_user_version(sock)
            time.sleep(0.3)
            text = bridge.stderr()
        connected = [line for line in text.splitlines() if "client connected" in line]
        version = [line for line in text.splitlines() if "VERSION 0.0 negotiated" in line]
        assert connected and connected[0].endswith(f"[socket={sock} initiator={ini}]")
        assert version and version[0].endswith(f"[socket={sock} initiator={ini}]")
        # debug: what the guest sent, per message, with the connection.
        assert any("bridge.vfio_user.trace: VERSION id 1" in line and f"initiator={ini}" in line
                   for line in text.splitlines()), text
        with Bridge(cfg, "--log-format", "json") as bridge:
            vfio_user_version(sock)
            time.sleep(0.3)
            records = [json.loads(line) for line in bridge.stderr().splitlines()]
        conn = [r for r in records if r["message"] == "client connected"]
        assert conn and conn[0]["socket"] == str(sock) and conn[0]["initiator"] == ini
        assert {"time", "level", "logger", "message"} <= set(conn[0])
