"""The QEMU options that attach a guest to the bridge, from the shipped qemu-configs files.

The files (one argument per line, '#' comments, @NAME@ placeholders) are the tested
configuration: the booted-guest harness reads the same ones. They are package data
(``bridge/qemu_configs``), so an installed bridge prints exactly what its tests ran.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from importlib import resources

_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")


def config_text(name: str) -> str:
    """The text of one shipped QEMU configuration file, e.g. ``vfio-user.args``."""
    return (resources.files("bridge") / "qemu_configs" / name).read_text()


def load_args(name: str, values: Mapping[str, str]) -> list[str]:
    """The arguments of ``name``, placeholders filled from ``values`` (KeyError if one is missing)."""
    args: list[str] = []
    for raw in config_text(name).splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue

        def fill(m: re.Match[str]) -> str:
            if m.group(1) not in values:
                raise KeyError(f"qemu-configs/{name}: no value for placeholder @{m.group(1)}@")
            return values[m.group(1)]

        args.append(_PLACEHOLDER.sub(fill, line))
    return args


def vfio_user_args(socket: str, mem: str, device_id: str = "vscsi0") -> list[str]:
    """Options for one virtio-scsi device on the bridge's ``socket``, with shared guest RAM."""
    args = load_args("vfio-user.args", {"SOCKET": socket, "MEM": mem})
    return [a.replace('"id":"vscsi0"', f'"id":"{device_id}"') for a in args]


def shell_lines(args: list[str]) -> str:
    """Options as shell words, each option with its value on one line, joined by backslashes."""
    lines: list[str] = []
    i = 0
    while i < len(args):
        if args[i].startswith("-") and i + 1 < len(args) and not args[i + 1].startswith("-"):
            lines.append(f"{shlex.quote(args[i])} {shlex.quote(args[i + 1])}")
            i += 2
        else:
            lines.append(shlex.quote(args[i]))
            i += 1
    return " \\\n".join(lines)
