"""The service's parts in process: sd_notify datagrams, the log rate limit, lock modes."""

from __future__ import annotations

import logging
import os
import socket
import uuid

import pytest

from bridge.daemon import sd_notify
from bridge.daemon.locks import (
    PERM_BASE,
    SHARED_BASE,
    ImageLock,
    LockMode,
    ofd_conflict,
)
from bridge.daemon.logs import RateLimited
from bridge.startup import StartupError


def test_sd_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"vscsi-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify.notify("READY=1", "STATUS=up")
        assert listener.recv(100) == b"READY=1\nSTATUS=up"


def test_sd_notify_without_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    assert sd_notify.notify("READY=1") is False  # logged, never raised


def test_rate_limited_debug_drops_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    logger = logging.getLogger("test.rate")
    limited = RateLimited(logger, burst=3, interval=1.0, clock=lambda: now[0])
    with caplog.at_level(logging.DEBUG, logger="test.rate"):
        for i in range(10):
            limited.debug("msg %d", i)
        now[0] = 1.5
        limited.debug("later")
    assert [r.getMessage() for r in caplog.records] == [
        "msg 0", "msg 1", "msg 2", "7 more lines like these dropped (rate limit 3 per 1 s)", "later"]


@pytest.mark.parametrize("mode,locked", [
    (LockMode.for_lu(read_only=False, share_rw=False), {100, 101, 103, 201, 203}),
    (LockMode.for_lu(read_only=False, share_rw=True), {100, 101, 203}),
    (LockMode.for_lu(read_only=True, share_rw=False), {100, 201, 203}),
])
def test_lock_bytes_are_qemus(mode: LockMode, locked: set[int], tmp_path) -> None:  # type: ignore[no-untyped-def]
    img = tmp_path / "i.img"
    img.write_bytes(bytes(4096))
    lock = ImageLock(str(img), mode)
    lock.acquire()
    probe = os.open(img, os.O_RDONLY)
    try:
        held = {off for base in (PERM_BASE, SHARED_BASE) for off in range(base, base + 4)
                if ofd_conflict(probe, off, 1) != 2}  # 2 = F_UNLCK
        assert held == locked
    finally:
        os.close(probe)
        lock.release()
    again = ImageLock(str(img), LockMode.for_lu(False, False))
    again.acquire()  # released: an exclusive writer gets it now
    with pytest.raises(StartupError, match="in use"):
        ImageLock(str(img), LockMode.for_lu(True, False)).acquire()
    again.release()


def test_shipped_systemd_unit_verifies(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil
    import subprocess
    from pathlib import Path

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze not found: apt-get install systemd to check the unit file")
    unit = (Path(__file__).resolve().parents[2] / "packaging" / "systemd" / "vscsi-bridge.service").read_text()
    assert "Type=notify" in unit and "RestartPreventExitStatus=2" in unit
    # The executable is checked for existence; everything else as shipped.
    (tmp_path / "vscsi-bridge.service").write_text(unit.replace("/usr/local/bin/vscsi-bridge", "/bin/true"))
    r = subprocess.run([analyze, "verify", str(tmp_path / "vscsi-bridge.service")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


async def test_xen_attach_resolves_a_domain_name(nursery) -> None:  # type: ignore[no-untyped-def]
    from bridge.cli import _resolve_domain
    from bridge.xen.xenstore import open_xenstore
    from tests.xen_sim.xenstored import SimXenstored

    xsd = SimXenstored(nursery)
    async with open_xenstore(await xsd.connect(0)) as xs:
        await xs.write("/local/domain/7/name", "domu1")
        await xs.write("/local/domain/9/name", "other")
        assert await _resolve_domain(xs, "domu1") == 7
        assert await _resolve_domain(xs, "12") == 12
        with pytest.raises(StartupError, match=r"^xen: no running domain named 'gone' \(see `xl list`\)$"):
            await _resolve_domain(xs, "gone")
