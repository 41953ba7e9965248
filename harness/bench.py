"""What the benchmarks (tests/bench/, images/xen/bench_backends.py) share: where results
go, and bench-only Python packages installed on demand."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import cache_dir

BENCH_DIR = cache_dir() / "bench"


def pip_install(module: str, package: str) -> bool:
    """Import ``module`` or pip-install ``package`` into this interpreter's venv; True if usable."""
    try:
        __import__(module)
        return True
    except ImportError:
        pass
    print(f"[bench] installing {package} into {sys.prefix} (bench-only dependency)", flush=True)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", package], check=False)
    if r.returncode != 0:
        print(f"[bench] pip install {package} failed (exit {r.returncode})", flush=True)
        return False
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def export_bridge_rev(rev: str) -> Path:
    """bridge/ as committed at ``rev``, exported once to $VSCSI_CACHE/bench/src-<sha>: the
    figures belong to a known version while the checkout is being edited, and a lever's
    before and after can run side by side."""
    repo = Path(__file__).resolve().parents[1]
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", rev],
                         capture_output=True, text=True, check=True).stdout.strip()
    dest = BENCH_DIR / f"src-{sha}"
    if not (dest / "bridge" / "cli.py").exists():
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="src-", dir=BENCH_DIR))
        archive = subprocess.run(["git", "-C", str(repo), "archive", sha, "bridge"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    return dest
