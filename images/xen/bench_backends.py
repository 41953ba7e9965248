"""Benchmark (prints figures, asserts nothing): the bridge's Xen backend against Linux's
xen-scsiback + LIO fileio, in one Xen-in-QEMU boot, same domU kernel, same image.

    python3 images/xen/bench_backends.py [--strategies auto,map,copy] [--runtime 5] [--profile]
                                         [--before-rev REV [--before-strategies map,copy]]

One phase per bridge grant strategy (`vscsi-bridge serve` from the checkout, lib.sh bridge_start) serving /tmp/disk.img
(dom0 tmpfs), then one with xen-scsiback + LIO on the same file. Each phase boots a PV domU with
fio and runs the same rows (IOPS, bandwidth, completion-latency p50/p99). Under TCG the guest CPU
is slow and other load on the host moves every number: the ratio bridge/kernel of one run is the
figure, not the absolute values. Writes $VSCSI_CACHE/bench/xen-<timestamp>.{json,md,png}.

--profile runs py-spy (the host venv's static binary, copied into the run directory) on the
bridge in dom0 for each bridge phase: busy samples only (not the event loop waiting), ranked
in the .md and as a flame graph per strategy (xen-<timestamp>-<strategy>.flame.svg). Sampling
costs dom0 CPU: the figures of a profiled run are not the benchmark's.

--before-rev REV adds a phase per strategy with bridge/ as committed at REV (shared into dom0
as /tmp/before), in the same boot: a lever's before and after side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from harness.bench import BENCH_DIR, export_bridge_rev, pip_install  # noqa: E402
from harness.profile import (  # noqa: E402
    drop_thread_roots,
    flamegraph_svg,
    parse_collapsed,
    py_spy_binary,
    split_waiting,
    top_functions,
)
from harness.xen import run_xen  # noqa: E402

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
[ -z "{before}" ] || {{ mkdir -p /tmp/before &&
    mount -t 9p -o trans=virtio,version=9p2000.L,ro before /tmp/before || exit 9; }}
for p in {phases}; do  # NAME:STRATEGY:SOURCE
    name=${{p%%:*}}; rest=${{p#*:}}; s=${{rest%%:*}}; src=${{rest#*:}}
    echo "phase $name: starting"
    VSCSI_SRC=$src bridge_start /vscsi/run/$name.log $name /tmp/disk.img $((128 << 20)) \
        --grant-strategy $s || exit 10
    boot_guest $name || exit 11
    spy=
    if [ -f /vscsi/run/py-spy ]; then  # --profile: sample the bridge for the whole phase
        chmod +x /vscsi/run/py-spy
        /vscsi/run/py-spy record --nonblocking --rate 50 --format raw -p "$BRIDGE_PID" \
            -o /vscsi/run/pyspy-$name.txt >/vscsi/run/pyspy-$name.err 2>&1 &
        spy=$!
    fi
    bridge_attach "$dom" 0 0 >/dev/null || exit 12
    domu_wait_gone $name 900
    echo "phase $name: domU rc $(domu_rc $name)"
    bridge_stop; echo "phase $name: bridge exit $?"
    [ -z "$spy" ] || wait $spy  # py-spy writes its file when the bridge exits
    vscsi_remove_nodes "$dom" 0
    grep -v ' DEBUG ' /vscsi/run/$name.log | tail -4
done
echo "phase kernel: starting"
lio_fileio_pvscsi /tmp/disk.img $((128 << 20)) naa.6001405000000010 0 || exit 20
boot_guest kernel || exit 21
vscsi_write_nodes "$dom" 0 naa.6001405000000010:0 0:0:0:0
domu_wait_gone kernel 900
echo "phase kernel: domU rc $(domu_rc kernel)"
"""

GUEST = r"""
i=0
while [ ! -e /dev/sda ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
[ -e /dev/sda ] || {{ echo "no /dev/sda"; exit 1; }}
f() {{ # NAME RW BS QD
    fio --name=$1 --filename=/dev/sda --direct=1 --ioengine=libaio --rw=$2 --bs=$3 --iodepth=$4 \
        --size=128M --runtime={runtime} --time_based --percentile_list=50:99 >/tmp/$1.out 2>&1
    grep -E ' IOPS=' /tmp/$1.out | sed "s/^/BENCH $1 /"
    echo "BENCHLAT $1 $(grep -A1 'clat percentiles' /tmp/$1.out | tr -d '\n')"
}}
{rows}
"""

UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
BENCH_RE = re.compile(r"BENCH (\S+) +\w+: IOPS=([\d.]+)(k?), BW=([\d.]+)([KMG]?i?B)/s")
LAT_RE = re.compile(r"BENCHLAT (\S+) +clat percentiles \((nsec|usec|msec)\):.*?"
                    r"50(?:\.0+)?th=\[ *(\d+)\].*?99(?:\.0+)?th=\[ *(\d+)\]")
LAT_SCALE = {"nsec": 1e-3, "usec": 1.0, "msec": 1e3}


def log(msg: str) -> None:
    print(f"[xen-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse(console: str) -> dict[str, dict[str, float]]:
    """Row name -> iops, bytes/s and clat p50/p99 (microseconds) from fio's output."""
    out: dict[str, dict[str, float]] = {}
    for m in BENCH_RE.finditer(console):
        iops = float(m.group(2)) * (1000 if m.group(3) else 1)
        out[m.group(1)] = {"iops": iops, "bw": float(m.group(4)) * UNITS.get(m.group(5), 1)}
    for m in LAT_RE.finditer(console):
        scale = LAT_SCALE[m.group(2)]
        row = out.setdefault(m.group(1), {})
        row["p50_us"] = int(m.group(3)) * scale
        row["p99_us"] = int(m.group(4)) * scale
    return out


def table(phases: dict[str, dict[str, dict[str, float]]], names: list[str]) -> list[str]:
    """One line per row: the kernel backend, then each bridge phase (name without its
    ``bridge-`` prefix) with its ratio to the kernel."""
    kernel = phases.get("kernel", {})
    labels = {n: n.removeprefix("bridge-") + " IOPS" for n in names}
    widths = {n: max(11, len(label)) for n, label in labels.items()}
    head = f"{'row':18} {'kernel IOPS':>11} {'p50 us':>8}"
    for n in names:
        head += f" {labels[n]:>{widths[n]}} {'p50 us':>8} {'ratio':>6}"
    lines = [head]
    for name, *_ in ROWS:
        k = kernel.get(name, {})
        line = f"{name:18} {k.get('iops', 0):>11.0f} {k.get('p50_us', 0):>8.0f}"
        for n in names:
            b = phases.get(n, {}).get(name, {})
            ratio = f"{b['iops'] / k['iops']:.2f}" if b.get("iops") and k.get("iops") else "-"
            line += f" {b.get('iops', 0):>{widths[n]}.0f} {b.get('p50_us', 0):>8.0f} {ratio:>6}"
        lines.append(line)
    return lines


def plot(path: Path, phases: dict[str, dict[str, dict[str, float]]], title: str) -> bool:
    if not pip_install("matplotlib", "matplotlib"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, *_ in ROWS]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(phases))
    for i, (phase, rows) in enumerate(phases.items()):
        xs = [j + i * width for j in range(len(names))]
        ax1.bar(xs, [rows.get(n, {}).get("iops", 0) for n in names], width, label=phase)
        ax2.bar(xs, [rows.get(n, {}).get("p50_us", 0) for n in names], width, label=phase)
    for ax, ylabel in ((ax1, "IOPS"), (ax2, "completion latency p50 (us)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=20,
                      fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    ax2.set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def profiles(run_dir: Path | None, names: list[str], stem: Path) -> str:
    """The dom0 py-spy profiles as Markdown (top functions, busy samples only), printed too;
    a flame graph per strategy next to the table."""
    out = []
    for s in names:
        raw = run_dir / f"pyspy-{s}.txt" if run_dir is not None else None
        if raw is None or not raw.exists():
            err = run_dir / f"pyspy-{s}.err" if run_dir is not None else None
            why = err.read_text(errors="replace")[-300:] if err is not None and err.exists() else ""
            out.append(f"\n## {s}: no profile {why!r}\n")
            continue
        busy, waiting = split_waiting(drop_thread_roots(parse_collapsed(raw.read_text())))
        samples, top = top_functions(busy, 20)
        svg = stem.parent / f"{stem.name}-{s}.flame.svg"
        svg.write_text(flamegraph_svg(busy, f"vscsi-bridge in a Xen dom0, phase {s}"))
        out += [f"\n## {s}: py-spy in dom0, {samples} busy samples = 100 % "
                f"(+{waiting} waiting in epoll_wait), 50 Hz over the whole phase\n",
                "| function | self % | total % |", "|---|---|---|",
                *(f"| `{f}` | {own:.1f} | {incl:.1f} |" for f, own, incl in top)]
    text = "\n".join(out) + "\n"
    print(text)
    return text


def _progress(line: str) -> None:
    if re.search(r"phase |BENCH |VSCSI-DOMU-RC|VSCSI-XEN-DOM0-RC|vscsi-dom0:", line):
        log(line.strip())


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategies", default="auto,map,copy",
                    help="bridge grant strategies, comma-separated (auto, map, copy)")
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio row")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy the bridge in dom0 during each bridge phase")
    ap.add_argument("--before-rev", metavar="REV",
                    help="also a phase per strategy with the bridge as committed at REV "
                         "(before-<strategy>), same boot: a lever's before and after")
    ap.add_argument("--reverse", action="store_true",
                    help="run the bridge phases in reverse order (order effects: the dom0's image "
                         "and page cache change from phase to phase)")
    ap.add_argument("--before-strategies",
                    help="the strategies of the --before-rev phases (default: --strategies)")
    args = ap.parse_args()
    strategies = [s for s in args.strategies.split(",") if s]
    phase_specs = [f"bridge-{s}:{s}:/vscsi/src" for s in strategies]
    shares: dict[str, Path] = {}
    if args.before_rev:
        shares["before"] = export_bridge_rev(args.before_rev)
        before = [s for s in (args.before_strategies or args.strategies).split(",") if s]
        phase_specs += [f"before-{s}:{s}:/tmp/before" for s in before]
    if args.reverse:
        phase_specs.reverse()
    names = [spec.split(":")[0] for spec in phase_specs]
    rows = "\n".join(f"f {n} {rw} {bs} {qd}" for n, rw, bs, qd in ROWS)
    log(f"one Xen boot: {len(names)} bridge phase(s) ({', '.join(names)}) then "
        f"xen-scsiback + LIO; {len(ROWS)} fio rows of {args.runtime} s each per phase")
    files: dict[str, str | bytes] = {"guest.sh": GUEST.format(runtime=args.runtime, rows=rows)}
    if args.profile:
        spy = py_spy_binary()
        if spy is None:
            log("--profile: py-spy is not available")
            return 2
        files["py-spy"] = Path(spy).read_bytes()
    result = await run_xen(
        DOM0.format(phases=" ".join(phase_specs), before="1" if args.before_rev else ""),
        files=files,
        extra_shares=shares,
        timeout=3600,
        progress=_progress,
        keep=True if args.profile else None,
    )
    print(result.script_output)
    phases = {n: parse(result.domu_console(n)) for n in names}
    phases["kernel"] = parse(result.domu_console("kernel"))
    title = (f"Xen PV domU (TCG), fio O_DIRECT libaio, {args.runtime} s per row; "
             f"ratio = bridge IOPS / kernel IOPS")
    print(title + f"; whole run {result.seconds:.0f} s (rc {result.rc})")
    lines = table(phases, names)
    print("\n".join(lines))
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    stem = BENCH_DIR / f"xen-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    stem.with_suffix(".json").write_text(json.dumps(
        {"runtime": args.runtime, "rc": result.rc, "seconds": result.seconds,
         "before_rev": args.before_rev, "phases": phases}, indent=1))
    md = f"{title}\n\n```\n" + "\n".join(lines) + "\n```\n"
    if args.profile:
        md += profiles(result.run_dir, names, stem)
        if result.run_dir is not None and os.environ.get("VSCSI_XEN_KEEP") != "1":
            shutil.rmtree(result.run_dir, ignore_errors=True)
    stem.with_suffix(".md").write_text(md)
    wrote = plot(stem.with_suffix(".png"), phases, title)
    log(f"wrote {stem}.json, .md" + (", .png" if wrote else " (no plot: matplotlib missing)"))
    return 0 if result.rc == 0 else 1


if __name__ == "__main__":
    sys.exit(trio.run(main))
