"""Benchmark (prints figures, asserts nothing): the bridge's Xen backend against Linux's
xen-scsiback + LIO fileio, in one Xen-in-QEMU boot, same domU kernel, same image.

    python3 images/xen/bench_backends.py [--strategy map] [--runtime 5]

Phase 1 serves /tmp/disk.img (dom0 tmpfs) with the bridge (dom0-bridge.py, the checkout's code);
phase 2 with xen-scsiback + LIO on the same file. Each phase boots a PV domU with fio and runs the
same fio rows. Under TCG the guest CPU is slow and other load on the host moves every number:
the ratio bridge/kernel of one run is the figure, not the absolute values.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.integration.xen_harness import run_xen  # noqa: E402

ROWS = [
    ("randread-4k-qd1", "randread", "4k", 1),
    ("randread-4k-qd16", "randread", "4k", 16),
    ("randwrite-4k-qd16", "randwrite", "4k", 16),
    ("read-128k-qd16", "read", "128k", 16),
    ("write-128k-qd16", "write", "128k", 16),
]

DOM0 = r"""
set -u
truncate -s 128M /tmp/disk.img
export DOMU_FIO=1
boot_guest() {{ # NAME: a booted domU (modules loaded) whose domid is in $dom
    dom=$(domu_create $1 /vscsi/run/guest.sh) || return 2
    xl unpause $1
    domu_wait_booted $1 300 || return 3
}}
bridge_start /vscsi/run/bridge.log bridge /tmp/disk.img $((128 << 20)) --grant-strategy {strategy} || exit 10
boot_guest bridge || exit 11
bridge_attach "$dom" 0 0 >/dev/null || exit 12
domu_wait_gone bridge 900
echo "phase bridge: domU rc $(domu_rc bridge)"
bridge_stop; echo "phase bridge: bridge exit $?"
vscsi_remove_nodes "$dom" 0
lio_fileio_pvscsi /tmp/disk.img $((128 << 20)) naa.6001405000000010 0 || exit 20
boot_guest kernel || exit 21
vscsi_write_nodes "$dom" 0 naa.6001405000000010:0 0:0:0:0
domu_wait_gone kernel 900
echo "phase kernel: domU rc $(domu_rc kernel)"
grep -v ' DEBUG ' /vscsi/run/bridge.log | tail -8
"""

GUEST = r"""
i=0
while [ ! -e /dev/sda ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
[ -e /dev/sda ] || {{ echo "no /dev/sda"; exit 1; }}
f() {{ # NAME RW BS QD
    fio --name=$1 --filename=/dev/sda --direct=1 --ioengine=libaio --rw=$2 --bs=$3 --iodepth=$4 \
        --size=128M --runtime={runtime} --time_based 2>&1 | grep -E ' IOPS=' | sed "s/^/BENCH $1 /"
}}
{rows}
"""

UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
BENCH_RE = re.compile(r"BENCH (\S+) +\w+: IOPS=([\d.]+)(k?), BW=([\d.]+)([KMG]?i?B)/s")


def parse(console: str) -> dict[str, tuple[float, float]]:
    """Row name -> (IOPS, bytes/s) from fio's summary lines."""
    out = {}
    for m in BENCH_RE.finditer(console):
        iops = float(m.group(2)) * (1000 if m.group(3) else 1)
        out[m.group(1)] = (iops, float(m.group(4)) * UNITS.get(m.group(5), 1))
    return out


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", default="map", help="bridge grant strategy (map or copy)")
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio row")
    args = ap.parse_args()
    rows = "\n".join(f"f {n} {rw} {bs} {qd}" for n, rw, bs, qd in ROWS)
    result = await run_xen(
        DOM0.format(strategy=args.strategy),
        files={"guest.sh": GUEST.format(runtime=args.runtime, rows=rows)},
        timeout=2400,
    )
    print(result.script_output)
    bridge, kernel = parse(result.domu_console("bridge")), parse(result.domu_console("kernel"))
    print(
        f"Xen PV domU, fio O_DIRECT libaio, {args.runtime} s per row; bridge grant strategy "
        f"{args.strategy}; whole run {result.seconds:.0f} s (rc {result.rc})"
    )
    print(
        f"{'row':20} {'bridge IOPS':>12} {'kernel IOPS':>12} {'bridge MiB/s':>13} "
        f"{'kernel MiB/s':>13} {'ratio':>7}"
    )
    for name, *_ in ROWS:
        b, k = bridge.get(name), kernel.get(name)
        ratio = f"{b[0] / k[0]:.3f}" if b and k and k[0] else "-"
        print(
            f"{name:20} {b[0] if b else '-':>12} {k[0] if k else '-':>12} "
            f"{(f'{b[1] / 2**20:.2f}' if b else '-'):>13} "
            f"{(f'{k[1] / 2**20:.2f}' if k else '-'):>13} {ratio:>7}"
        )
    return 0 if result.rc == 0 else 1


if __name__ == "__main__":
    sys.exit(trio.run(main))
