#!/usr/bin/env bash
# Create (or reuse) this checkout's venv outside the checkout and print its path.
# One venv per checkout ($VSCSI_CACHE/venv-<hash of the checkout's path>), with this checkout
# installed editable: two checkouts on one machine never run each other's code. Keyed also by
# pyproject.toml: a change of dependencies rebuilds it. Used by tests/run and images/demo.sh.
# --path: print the path only.
set -euo pipefail
cd "$(dirname "$0")/.."
export VSCSI_CACHE="${VSCSI_CACHE:-$HOME/.cache/vscsi-bridge}"
VENV="$VSCSI_CACHE/venv-$(pwd -P | sha256sum | cut -c1-12)"
if [ "${1:-}" = --path ]; then echo "$VENV"; exit 0; fi   # where it is, without creating it
need_apt=()
command -v gcc >/dev/null || need_apt+=(gcc libc6-dev)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
[ -f /usr/include/xen/io/vscsiif.h ] || need_apt+=(libxen-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "[setup] apt-get install ${need_apt[*]}" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
stamp="$VENV/.inputs-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "[setup] creating venv $VENV for $(pwd -P)" >&2
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip setuptools wheel >&2
    "$VENV/bin/pip" install -q -e '.[test]' >&2
    echo "$(pwd -P)" >"$VENV/.checkout"
    touch "$stamp"
fi
echo "$VENV"
