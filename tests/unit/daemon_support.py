"""Helpers for the tests of the bridge as a process: configurations, a running ``serve``,
and a minimal synchronous vfio-user client (the VERSION handshake QEMU starts with)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def short_dir() -> Path:
    """A directory under /tmp: unix socket paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix="vscsi-d-", dir="/tmp"))


@contextmanager
def workdir() -> Iterator[Path]:
    d = short_dir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def write_config(d: Path, body: str = "", *, name: str = "bridge.toml", image: str = "disk.img",
                 size: int = 1 << 20, state_dir: str = "run", extra_bridge: str = "",
                 lu_extra: str = "") -> Path:
    """A configuration with one LU on ``image`` (created sparse) and one vfio-user socket,
    unless ``body`` replaces the attachments."""
    img = d / image
    if not img.exists():
        with img.open("wb") as f:
            f.truncate(size)
    attachments = body or '[[vfio_user]]\nsocket = "vm.sock"\nluns = { 0 = "disk" }\n'
    text = (f'[bridge]\nstate_dir = "{state_dir}"\n{extra_bridge}\n'
            f'[[lu]]\nname = "disk"\npath = "{img}"\n{lu_extra}\n{attachments}')
    path = d / name
    path.write_text(text)
    return path


def run_cli(*args: str, env: Mapping[str, str] | None = None, timeout: float = 60,
            python: str | None = None, cwd: Path | None = REPO) -> subprocess.CompletedProcess[str]:
    argv = [python or sys.executable, "-m", "bridge.cli", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})


class Bridge:
    """``vscsi-bridge serve`` in its own process, started and waited for."""

    def __init__(self, config: Path, *args: str, env: Mapping[str, str] | None = None,
                 command: list[str] | None = None, cwd: Path | None = REPO) -> None:
        self.ready = config.parent / f"ready-{time.monotonic_ns()}"
        self.stderr_path = config.parent / f"stderr-{time.monotonic_ns()}"
        argv = command or [sys.executable, "-m", "bridge.cli"]
        self._stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen([*argv, "serve", "--config", str(config),
                                      "--ready-file", str(self.ready), *args],
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True, cwd=cwd,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 30) -> Bridge:
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}: {self.stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"serve not ready within {timeout} s: {self.stderr()}")
            time.sleep(0.05)
        return self

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._stderr.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return rc

    def __enter__(self) -> Bridge:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_HEADER = struct.Struct("=HHIII")  # msg_id, command, size, flags, error (vfio-user 1.0)


def vfio_user_version(path: str | Path, timeout: float = 10) -> dict:
    """Connect to a vfio-user socket, send VERSION as QEMU does; the server's capabilities."""
    caps = {"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1048576, "pgsizes": 4096}}
    payload = struct.pack("=HH", 0, 0) + json.dumps(caps).encode() + b"\0"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(_HEADER.pack(1, 1, _HEADER.size + len(payload), 0, 0) + payload)
        data = b""
        while len(data) < _HEADER.size or len(data) < _HEADER.unpack_from(data)[2]:
            chunk = s.recv(65536)
            if not chunk:
                raise AssertionError(f"server closed after {len(data)} bytes")
            data += chunk
    msg_id, command, size, flags, error = _HEADER.unpack_from(data)
    assert (msg_id, command, error) == (1, 1, 0), (msg_id, command, flags, error)
    body = data[_HEADER.size:size]
    assert struct.unpack_from("=HH", body) == (0, 0)
    return json.loads(body[4:].rstrip(b"\0"))["capabilities"]
