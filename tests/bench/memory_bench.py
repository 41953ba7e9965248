"""Memory of ``vscsi-bridge serve`` with 1, 8 and 32 attached vfio-user guests (not a test;
the budget is held by tests/hostile/test_memory_budget.py).

Each guest: a vfio-user client connected as QEMU + Linux make it (VERSION, 1 MiB guest RAM
DMA_MAP'd, MSI-X eventfds, virtio-scsi queues up, DRIVER_OK) doing a few 4 KiB READs, each
attachment served with 2 request queues of 256 entries (tests/hostile/memory.py). Prints
KiB from /proc/<pid>/status, medians of --rounds runs:

    python tests/bench/memory_bench.py [--counts 1 8 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from tests.hostile.memory import measure  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    rows = {}
    for n in args.counts:
        runs = [measure(n) for _ in range(args.rounds)]
        rows[n] = {(state, key): statistics.median(r[state][key] for r in runs)
                   for state in ("idle", "attached") for key in ("VmRSS", "RssAnon", "RssShmem")}
    print("| guests | VmRSS idle | VmRSS attached | RssAnon attached | RssShmem attached "
          "| RssAnon per guest over 1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    first = args.counts[0]
    for n, r in rows.items():
        per = ((r["attached", "RssAnon"] - rows[first]["attached", "RssAnon"]) / (n - first)
               if n != first else None)
        print(f"| {n} | {r['idle', 'VmRSS'] / 1024:.1f} MiB | {r['attached', 'VmRSS'] / 1024:.1f} MiB "
              f"| {r['attached', 'RssAnon'] / 1024:.1f} MiB | {r['attached', 'RssShmem']:.0f} KiB "
              + (f"| {per:.0f} KiB |" if per is not None else "| - |"))


if __name__ == "__main__":
    main()
