"""What the benchmarks (tests/bench/, images/xen/bench_backends.py) share: where results
go, and bench-only Python packages installed on demand."""

from __future__ import annotations

import subprocess
import sys

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
