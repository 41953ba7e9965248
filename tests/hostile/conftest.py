"""One real ``vscsi-bridge serve`` for the hostile harness, and its good guest.

The bridge runs as a user runs it (``python -m bridge.cli serve --config``)
with two vfio-user sockets: ``good.sock`` carries a well-behaved guest doing
checked I/O the whole time (client.GoodGuest), ``hostile.sock`` takes the
attacks. The bridge's RLIMIT_NOFILE is lowered to ``NOFILE`` so that the
fd attacks reach the limit quickly; the budgets it derives are the ones in
bridge/vfio_user/budget.py for that limit and two sockets.

After each attack (``Bridge.must_recover``): the process is alive, and its
fd count and RSS are back within ``FD_SLACK`` / ``RSS_SLACK_KIB`` of the
baseline taken once the good guest was running.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.hostile.client import GoodGuest, VfioUserClient

REPO = Path(__file__).resolve().parents[2]
NOFILE = 1024  # the bridge's fd limit in this harness (a common default soft limit)
SOCKETS = 2
GOOD_DEADLINE = 5.0  # seconds: the longest the good guest may wait for one request
FD_SLACK = 2  # fds above the baseline once the hostile client is gone
RSS_SLACK_KIB = 16 * 1024  # RSS above the baseline once the hostile client is gone
RECOVERY_TIME = 10.0  # seconds allowed for fds/RSS to come back

CONFIG = """
[bridge]
state_dir = "{run}"
log_level = "info"

[[lu]]
name = "good"
path = "good.img"
size = "8MiB"

[[lu]]
name = "hostile"
path = "hostile.img"
size = "8MiB"

[[vfio_user]]
socket = "good.sock"
num_queues = 1
queue_size = 64
luns = {{ 0 = "good" }}

[[vfio_user]]
socket = "hostile.sock"
num_queues = 1
queue_size = 64
luns = {{ 0 = "hostile" }}
"""


def _limit_fds() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, hard))


class Bridge:
    def __init__(self, run: Path) -> None:
        self.run = run
        self.good_sock = str(run / "good.sock")
        self.hostile_sock = str(run / "hostile.sock")
        self.log_path = run / "bridge.log"
        cfg = run / "bridge.toml"
        cfg.write_text(CONFIG.format(run=run))
        ready = run / "ready"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge.cli", "serve", "--config", str(cfg),
             "--ready-file", str(ready)],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=_limit_fds,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert self.proc.poll() is None, f"the bridge exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"the bridge never got ready:\n{self.log()}"
            time.sleep(0.05)
        self.base_fds = 0
        self.base_rss_kib = 0

    # --- what the harness watches ---------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def set_baseline(self) -> None:
        time.sleep(0.2)
        self.base_fds = self.fds()
        self.base_rss_kib = self.rss_kib()

    def hostile(self, handshake: bool = True) -> VfioUserClient:
        c = VfioUserClient(self.hostile_sock)
        if handshake:
            c.handshake()
        return c

    @contextmanager
    def must_recover(self) -> Iterator[None]:
        """Around an attack: alive after it, fds and RSS back near the baseline."""
        log_start = self.log_size()
        yield
        assert self.alive(), f"the bridge died:\n{self.log()[-4000:]}"
        deadline = time.monotonic() + RECOVERY_TIME
        while time.monotonic() < deadline:
            fds, rss = self.fds(), self.rss_kib()
            if fds <= self.base_fds + FD_SLACK and rss <= self.base_rss_kib + RSS_SLACK_KIB:
                break
            time.sleep(0.05)
        assert fds <= self.base_fds + FD_SLACK, (
            f"{fds} fds open, baseline {self.base_fds}:\n{self.log()[log_start:][-3000:]}")
        assert rss <= self.base_rss_kib + RSS_SLACK_KIB, (
            f"RSS {rss} KiB, baseline {self.base_rss_kib} KiB")
        # the bridge still serves the hostile socket (the next client after a close)
        c = self.hostile()
        c.close()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        return rc


@pytest.fixture(scope="package")
def bridge() -> Iterator[Bridge]:
    run = Path(tempfile.mkdtemp(prefix="vscsi-hostile-", dir="/tmp"))
    b = Bridge(run)
    try:
        yield b
    finally:
        rc = b.stop()
        if rc == 0:
            shutil.rmtree(run, ignore_errors=True)
        else:
            print(f"bridge exit status {rc}; its log: {b.log_path}")


@pytest.fixture(scope="package")
def good(bridge: Bridge) -> Iterator[GoodGuest]:
    guest = GoodGuest(bridge.good_sock, GOOD_DEADLINE)
    guest.start()
    with guest.must_progress():
        pass
    # a first hostile connection, so that lazily built state is in the baseline
    bridge.hostile().close()
    bridge.set_baseline()
    try:
        yield guest
    finally:
        guest.stop()
        assert not guest.errors, guest.errors


@pytest.fixture
def attack(bridge: Bridge, good: GoodGuest) -> Iterator[Bridge]:
    """Every attack: the good guest progresses throughout, the bridge recovers after."""
    with good.must_progress(), bridge.must_recover():
        yield bridge
