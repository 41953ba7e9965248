"""The booted-guest harness's overrides and layout (no guest is booted here).

VSCSI_QEMU, VSCSI_KERNEL and VSCSI_INITRD replace what images/ builds, for every booted
test (harness.guest) and for Xen-in-QEMU (harness.xen, QEMU only); images/ scripts
import the harness, never tests/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness import REPO, cache_dir, xen
from harness import guest as g


def _no_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(name: str) -> str:
        raise AssertionError(f"images/{name} ran although the environment overrides it")

    monkeypatch.setattr(g, "_run_build_script", refuse)


def test_overrides_replace_the_built_qemu_kernel_and_initrd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_builds(monkeypatch)
    qemu, kernel, initrd = (tmp_path / n for n in ("qemu", "vmlinuz", "initrd.gz"))
    for f in (qemu, kernel, initrd):
        f.write_bytes(b"x")
    monkeypatch.setenv("VSCSI_QEMU", str(qemu))
    monkeypatch.setenv("VSCSI_KERNEL", str(kernel))
    monkeypatch.setenv("VSCSI_INITRD", str(initrd))
    assert g.qemu_binary() == qemu
    image = g.guest_image()
    assert (image.kernel, image.initramfs) == (kernel, initrd)
    launch = g._prepare(qemu=g.qemu_binary(), image=image, script="true", attach="none", socket=None,
                        disk_image=None, smp=1, mem="256M", accel="tcg", aio="threads", fio=None,
                        append="", extra_args=(), serial_extra=(), log_path=tmp_path / "log")
    try:
        assert launch.argv[0] == str(qemu)
        assert launch.argv[launch.argv.index("-kernel") + 1] == str(kernel)
        assert (launch.workdir / "initrd").read_bytes().startswith(b"x")
    finally:
        g._cleanup(launch.workdir)
    with pytest.raises(g.GuestError, match="VSCSI_FIO_LAYER"):
        g._prepare(qemu=qemu, image=image, script="fio --name=x", attach="none", socket=None,
                   disk_image=None, smp=1, mem="256M", accel="tcg", aio="threads", fio=None,
                   append="", extra_args=(), serial_extra=(), log_path=tmp_path / "log2")
    assert xen.qemu_binary() == str(qemu)


def test_an_override_naming_a_missing_file_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VSCSI_QEMU", "/nonexistent/qemu")
    with pytest.raises(g.GuestError, match="VSCSI_QEMU=/nonexistent/qemu: no such file"):
        g.qemu_binary()


def test_cache_is_under_home_or_vscsi_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VSCSI_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "vscsi-bridge"
    monkeypatch.setenv("VSCSI_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_images_do_not_import_tests() -> None:
    offenders = []
    for path in sorted((REPO / "images").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*(from|import)\s+tests(\.|\s|$)", line):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert offenders == []
    assert not (REPO / "tests" / "integration" / "guest.py").exists()
    assert not (REPO / "bridge" / "harness").exists()  # not installed with the bridge


def test_each_checkout_gets_its_own_venv(tmp_path: Path) -> None:
    import subprocess

    paths = []
    for name in ("one", "two"):
        checkout = tmp_path / name
        (checkout / "images").mkdir(parents=True)
        (checkout / "images" / "setup-venv.sh").write_bytes((REPO / "images" / "setup-venv.sh").read_bytes())
        r = subprocess.run(["bash", str(checkout / "images" / "setup-venv.sh"), "--path"], capture_output=True,
                           text=True, timeout=30, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
        assert r.returncode == 0, r.stderr
        paths.append(r.stdout.strip())
    assert paths[0] != paths[1]
    assert all(p.startswith(f"{tmp_path}/.cache/vscsi-bridge/venv-") for p in paths), paths


def test_build_outputs_and_caches_are_ignored_by_git() -> None:
    import subprocess

    names = ["build/lib/x.py", "dist/vscsi_bridge-0.1.0.whl", "bridge/__pycache__/cli.cpython-311.pyc",
             "vscsi_bridge.egg-info/PKG-INFO", ".pytest_cache/v", ".ruff_cache/x", ".hypothesis/x"]
    r = subprocess.run(["git", "-C", str(REPO), "check-ignore", "--no-index", *names],
                       capture_output=True, text=True, timeout=30)
    assert r.stdout.split() == names, r.stdout + r.stderr
