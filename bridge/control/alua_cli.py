"""``vscsi-bridge alua show|set`` and ``vscsi-bridge port down|up`` (control/alua_methods.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def fmt_alua(r: dict) -> str:
    lines = [f"implicit transition time: {r['implicit_transition_time']} s"]
    for g in r["groups"]:
        pref = " preferred" if g["preferred"] else ""
        lines.append(f"group {g['name']} (id {g['id']}): {g['state']}{pref}")
        for p in g["ports"]:
            lines.append(f"  port {p['relative_id']} {p['attachment']} "
                         f"{'up' if p['up'] else 'DOWN'} {p['name']}")
            lines += [f"    nexus {n}" for n in p["nexuses"]]
    return "\n".join(lines)


def _alua(args: argparse.Namespace) -> tuple[str, dict[str, Any], Callable[[Any], str]]:
    if args.alua_command == "show":
        return "alua.show", {}, fmt_alua
    return "alua.set", {"group": args.group, "state": args.state}, fmt_alua


def _port(args: argparse.Namespace) -> tuple[str, dict[str, Any], Callable[[Any], str]]:
    return f"port.{args.port_command}", {"port": args.port}, fmt_alua


def register(group: Callable[[str, str], Any], common: Callable[..., None]) -> None:
    alua = group("alua", "target port groups and their access states (ALUA)")
    sub = alua.add_subparsers(dest="alua_command", required=True)
    common(sub.add_parser("show", help="groups, states, ports"), _alua)
    p = sub.add_parser("set", help="set a group's access state (implicit transition)")
    p.add_argument("group", help="port group name or id")
    p.add_argument("state", help="active/optimized | active/non-optimized | standby | "
                                 "unavailable | offline | transitioning")
    common(p, _alua)
    port = group("port", "take a target port down (a failed link) or up")
    sub = port.add_subparsers(dest="port_command", required=True)
    for action, help in (("down", "fail the port's link"), ("up", "restore the port's link")):
        p = sub.add_parser(action, help=help)
        p.add_argument("port", help="relative target port id or attachment label")
        common(p, _port)
