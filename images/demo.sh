#!/usr/bin/env bash
# The main job: build what is missing (venv, QEMU 11, guest image), start the bridge on its
# default configuration (a sparse 1 GiB image), boot a Linux guest attached over vfio-user,
# show what the guest sees, and shut everything down.
set -euo pipefail
cd "$(dirname "$0")/.."
export VSCSI_CACHE="${VSCSI_CACHE:-$HOME/.cache/vscsi-bridge}"
VENV=$(bash images/setup-venv.sh)
# VSCSI_QEMU / VSCSI_KERNEL + VSCSI_INITRD: use those instead of building (harness/guest.py).
[ -n "${VSCSI_QEMU:-}" ] || bash images/build-qemu.sh
[ -n "${VSCSI_KERNEL:-}" ] && [ -n "${VSCSI_INITRD:-}" ] || bash images/build-guest.sh
exec "$VENV/bin/python" images/demo.py "$@"
