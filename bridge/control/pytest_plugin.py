"""pytest plugin (entry point ``pytest11: vscsi_bridge``): a running bridge per test.

Fixtures:

- ``vscsi_bridge``: starts ``vscsi-bridge serve`` (``sys.executable -m bridge.cli``) on a
  scratch 64 MiB image ``disk0`` served at LUN 0 of one vfio-user socket ``vm1.sock``,
  waits for its ready-file and hands the test a ``RunningBridge`` with a connected
  ``BlockingControlClient`` (``bridge.client``); stopped with SIGTERM afterwards.
- ``vscsi_bridge_factory``: ``start(config: dict | None = None)`` for other
  configurations (the TOML document as a dict; relative paths are taken from the
  scratch directory, which is also the state directory).

Fault injection: ``bridge.add_fault("disk0", "medium_error", lba_first=100, lba_last=107)``
returns the rule's id; ``bridge.client.fault_list()``, ``fault_remove(id=...)``,
``fault_clear()``. A test of its own (trio) client: ``await ControlClient.connect(bridge.control_socket)``.
Without the installed entry point: ``pytest -p bridge.control.pytest_plugin``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .client import BlockingControlClient
from .running import to_toml

READY_TIMEOUT = 60.0


def default_config() -> dict[str, Any]:
    return {
        "bridge": {"log_level": "info"},
        "lu": [{"name": "disk0", "path": "disk0.img", "size": "64MiB"}],
        "vfio_user": [{"socket": "vm1.sock", "luns": {"0": "disk0"}}],
    }


@dataclass
class RunningBridge:
    """One ``vscsi-bridge serve`` subprocess and a control client connected to it."""

    directory: Path  # scratch directory: images, sockets, the configuration, the log
    config_path: Path
    proc: subprocess.Popen
    client: BlockingControlClient
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def control_socket(self) -> str:
        return str(self.directory / "control.sock")

    def socket(self, name: str = "vm1.sock") -> str:
        """The path of a vfio-user socket (relative names are in the state directory)."""
        return str(self.directory / name)

    def cli(self, *args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``vscsi-bridge <args> --socket <control socket>``; text output captured."""
        return subprocess.run([sys.executable, "-m", "bridge.cli", *args, "--socket",
                               self.control_socket], capture_output=True, text=True,
                              check=check, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def add_fault(self, lu: str, action: str, **rule: Any) -> int:
        """``fault.add`` (bridge/scsi/faults.py): the new rule's id. Rules end with the
        bridge; ``client.fault_clear()`` ends them earlier."""
        return self.client.fault_add(lu=lu, action=action, **rule)["id"]

    def stop(self) -> int:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_bridge(directory: Path, config: dict[str, Any] | None = None,
                 timeout: float = READY_TIMEOUT) -> RunningBridge:
    """Write the configuration into ``directory`` (the state directory too), start
    ``serve`` and wait until it listens."""
    doc = config if config is not None else default_config()
    doc = {**doc, "bridge": {**doc.get("bridge", {}), "state_dir": str(directory)}}
    config_path = directory / "bridge.toml"
    config_path.write_text(to_toml(doc))
    ready = directory / "ready"
    log_path = directory / "bridge.log"
    cwd = Path(__file__).resolve().parents[2]  # the checkout, so `-m bridge.cli` is this one
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bridge.cli", "serve", "--config",
                                 str(config_path), "--ready-file", str(ready)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise RuntimeError(f"vscsi-bridge serve did not become ready (exit {proc.returncode}):\n"
                               + log_path.read_text(errors="replace")[-4000:])
        time.sleep(0.05)
    try:
        client = BlockingControlClient(str(directory / "control.sock"))
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return RunningBridge(directory, config_path, proc, client, log_path)


def _scratch() -> Path:
    # unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer
    return Path(tempfile.mkdtemp(prefix="vscsi-bridge-", dir="/tmp"))


@pytest.fixture
def vscsi_bridge_factory() -> Iterator[Callable[..., RunningBridge]]:
    started: list[tuple[RunningBridge, Path]] = []

    def start(config: dict[str, Any] | None = None) -> RunningBridge:
        directory = _scratch()
        try:
            bridge = start_bridge(directory, config)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        started.append((bridge, directory))
        return bridge

    yield start
    for bridge, directory in started:
        bridge.stop()
        if os.environ.get("VSCSI_BRIDGE_KEEP") != "1":
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def vscsi_bridge(vscsi_bridge_factory: Callable[..., RunningBridge]) -> RunningBridge:
    return vscsi_bridge_factory()
