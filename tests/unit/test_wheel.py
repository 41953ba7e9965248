"""Issue 11: the built wheel, installed into a fresh venv outside the checkout, serves.

Build the wheel (no network: the build backend comes from the test venv), install it
with its dependencies taken from this venv's own site-packages (no index), then, with
the checkout nowhere on sys.path: --version, check-config, and serve until ready plus a
vfio-user VERSION handshake. The QEMU configurations must come from the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.unit.daemon_support import REPO, Bridge, vfio_user_version, workdir, write_config


def _run(*argv: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, cwd=cwd,
                       env=env)
    assert r.returncode == 0, f"{argv}: {r.stdout}\n{r.stderr}"
    return r.stdout


def test_wheel_installed_outside_the_tree_serves(tmp_path: Path) -> None:
    src = tmp_path / "src"
    # A copy of the tree (the build writes build/ and *.egg-info next to the sources).
    shutil.copytree(REPO, src, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                  ".pytest_cache", ".ruff_cache", ".hypothesis"))
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist, src)
    wheels = list(dist.glob("vscsi_bridge-*.whl"))
    assert len(wheels) == 1, wheels
    import zipfile

    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "bridge/qemu_configs/vfio-user.args" in names and "bridge/cli.py" in names
    assert not any(n.startswith(("tests/", "images/", "harness/")) for n in names)
    meta = zipfile.ZipFile(wheels[0]).read(next(n for n in names if n.endswith("METADATA"))).decode()
    for line in ("License-Expression: MIT", "Requires-Dist: trio>=0.24", "Requires-Dist: outcome",
                 "Requires-Dist: pyroute2"):
        assert line in meta, meta[:2000]

    venv = tmp_path / "venv"
    # The test venv's packages are visible (trio, outcome, pyroute2: no index needed) but
    # the checkout is not; the wheel goes into the new venv itself.
    _run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv)
    pth = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    pth.mkdir(parents=True, exist_ok=True)
    (pth / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    py = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", wheels[0])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = tmp_path / "elsewhere"
    out.mkdir()
    where = _run(py, "-c", "import bridge; print(bridge.__file__)", cwd=out, env=env)
    assert where.startswith(str(venv)), where
    exe = venv / "bin" / "vscsi-bridge"
    assert _run(exe, "--version", cwd=out, env=env).startswith("vscsi-bridge 0.1.0")
    with workdir() as d:
        cfg = write_config(d)
        assert "LU disk:" in _run(exe, "check-config", cfg, cwd=out, env=env)
        assert "share=on" in _run(exe, "qemu-args", "-c", cfg, cwd=out, env=env)
        with Bridge(cfg, command=[str(exe)], cwd=out, env=env):
            assert vfio_user_version(d / "run" / "vm.sock")["max_msg_fds"] > 0
