"""Profiles for the benchmarks: py-spy's collapsed stacks read, ranked and drawn as a flame
graph (kvm_bench.py on the host, images/xen/bench_backends.py in a Xen dom0)."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def py_spy_binary() -> str | None:
    """The py-spy executable of this venv, pip-installing it if missing (it ships a binary only)."""
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        print(f"[bench] installing py-spy into {sys.prefix} (bench-only dependency)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=False)
    if exe.exists():
        return str(exe)
    return shutil.which("py-spy")


# Path prefixes dropped from frame names: venvs, the stdlib, checkouts (here and in a dom0).
_PATH_MARKERS = ("site-packages/", "dist-packages/", "lib/python3.11/", "/vscsi/img/pylib/",
                 "/vscsi/src/", "/work/main/")
# Leaf frames that are the event loop waiting for I/O, not work (py-spy's idle detection
# does not see trio's epoll_wait as idle).
WAITING_FILE = "trio/_core/_io_epoll.py)"
WAITING_FUNCS = frozenset({"get_events", "_epoll_wait"})

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in _PATH_MARKERS:
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m.group('func')} ({path})"


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append(([_frame_name(f) for f in stack.split(";")], int(count)))
    return stacks


def top_functions(stacks: list[tuple[list[str], int]], n: int = 15) -> tuple[int, list[tuple[str, float, float]]]:
    total = sum(c for _, c in stacks)
    own: dict[str, int] = defaultdict(int)
    incl: dict[str, int] = defaultdict(int)
    for frames, count in stacks:
        if frames:
            own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    ranked = sorted(own, key=lambda f: (own[f], incl[f]), reverse=True)[:n]
    return total, [(f, own[f] / total * 100, incl[f] / total * 100) for f in ranked] if total else []


def flamegraph_svg(stacks: list[tuple[list[str], int]], title: str) -> str:
    """A minimal flame graph (root at the bottom), one <rect> per frame, tooltips via <title>."""
    tree: dict[str, Any] = {"n": 0, "c": {}}
    for frames, count in stacks:
        node = tree
        node["n"] += count
        for f in frames:
            node = node["c"].setdefault(f, {"n": 0, "c": {}})
            node["n"] += count

    def depth(node: dict[str, Any]) -> int:
        return 1 + max((depth(c) for c in node["c"].values()), default=0)

    width, row = 1400.0, 16
    rows = depth(tree)
    height = rows * row + 40
    total = tree["n"] or 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height}" '
             'font-family="monospace" font-size="11">',
             f'<text x="5" y="15">{_xml(title)} ({total} samples)</text>']

    def draw(node: dict[str, Any], x: float, level: int) -> None:
        for name, child in sorted(node["c"].items()):
            w = child["n"] / total * width
            if w >= 0.5:
                y = height - (level + 1) * row
                hue = int(hashlib.md5(name.encode()).hexdigest()[:2], 16) % 60
                label = name if len(name) * 6.5 < w else name[: max(0, int(w / 6.5) - 2)]
                parts.append(
                    f'<g><title>{_xml(name)}: {child["n"]} ({child["n"] / total:.1%})</title>'
                    f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 1}" fill="hsl({hue},80%,60%)"/>'
                    f'<text x="{x + 2:.1f}" y="{y + 12}">{_xml(label)}</text></g>'
                )
                draw(child, x, level + 1)
            x += w

    draw(tree, 0.0, 0)
    parts.append("</svg>")
    return "\n".join(parts)


def _xml(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def drop_thread_roots(stacks: list[tuple[list[str], int]]) -> list[tuple[list[str], int]]:
    """py-spy --threads puts a "thread (0x...)" root on each stack: drop it so that
    functions aggregate over threads."""
    return [(frames[1:] if frames and frames[0].startswith(("thread", "process")) else frames, c)
            for frames, c in stacks]


def split_waiting(stacks: list[tuple[list[str], int]]) -> tuple[list[tuple[list[str], int]], int]:
    """The stacks doing work, and the number of samples waiting in the event loop."""
    busy, waiting = [], 0
    for frames, count in stacks:
        leaf = frames[-1] if frames else ""
        if leaf.endswith(WAITING_FILE) and leaf.split(" (")[0].rsplit(".", 1)[-1] in WAITING_FUNCS:
            waiting += count
        else:
            busy.append((frames, count))
    return busy, waiting
