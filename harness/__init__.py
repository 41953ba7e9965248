"""Booted-guest and Xen-in-QEMU harness shared by tests/ and images/ (not installed with
the bridge): ``harness.guest`` boots a Linux guest in QEMU 11 and runs scripts in it,
``harness.xen`` boots Xen 4.17 with a PV dom0 and runs a dom0 script.

Environment (both): VSCSI_CACHE (build cache, default ~/.cache/vscsi-bridge), VSCSI_QEMU
(the qemu-system-x86_64 to run instead of the one images/ builds), VSCSI_KERNEL and
VSCSI_INITRD (the KVM test guest's kernel and base initramfs instead of the built ones).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """$VSCSI_CACHE, else ~/.cache/vscsi-bridge of whoever runs the tests."""
    return Path(os.environ.get("VSCSI_CACHE") or Path.home() / ".cache" / "vscsi-bridge")
