"""The control subcommands of ``vscsi-bridge``: they talk to a running ``serve``.

``register(subparsers, file_status=...)`` adds ``lu``, ``lun``, ``attach``, ``status``,
``stats``, ``pr``, ``fault``, ``log-level`` and ``save-config`` and returns their names;
``run(args)`` runs one. Every command takes ``--socket`` (default: ``$VSCSI_BRIDGE_SOCKET``,
else ``<state_dir>/control.sock`` of ``--config``, else /run/vscsi-bridge/control.sock)
and ``--json``; output is a human-readable table otherwise. Errors are one line on
stderr; exit status 2 for usage and configuration errors, 1 for a refused operation or
when no bridge answers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from collections.abc import Callable
from typing import Any

from . import alua_cli
from .client import DEFAULT_SOCKET, BlockingControlClient, ControlError
from .jsonrpc import INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR

PROG = "vscsi-bridge"
_USAGE_CODES = (PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS)

FileStatus = Callable[[str], int]
_file_status: FileStatus | None = None


class UsageError(Exception):
    pass


# ------------------------------------------------------------------ socket and output

def socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return args.socket
    if env := os.environ.get("VSCSI_BRIDGE_SOCKET"):
        return env
    if args.config:
        try:
            with open(args.config, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise UsageError(f"configuration error: {args.config}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"configuration error: {args.config}: not valid TOML: {e}") from None
        bridge = data.get("bridge", {})
        state_dir = bridge.get("state_dir", "/run/vscsi-bridge") if isinstance(bridge, dict) else None
        if not isinstance(state_dir, str):
            raise UsageError(f"configuration error: {args.config}: bridge.state_dir: must be a string")
        return os.path.join(state_dir, "control.sock")
    return DEFAULT_SOCKET


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


def _size(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def _luns(m: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in m.items()) or "-"


# ------------------------------------------------------------------ human formats

def _fmt_lu_list(r: list[dict]) -> str:
    return table([[lu["name"], _size(lu["size"]), lu["block_size"], "ro" if lu["read_only"] else "rw",
                   lu["wwn"], lu["path"],
                   ", ".join(f"{m['initiator']} LUN {m['lun']}" for m in lu["mapped"]) or "-"]
                  for lu in r], ["NAME", "SIZE", "BLOCK", "MODE", "WWN", "PATH", "MAPPED"])


def _fmt_attach_list(r: list[dict]) -> str:
    def where(a: dict) -> str:
        return a.get("socket") or f"domain {a.get('domain')} vscsi {a.get('devid')}"

    def conn(a: dict) -> str:
        return {True: "yes", False: "no", None: "?"}[a.get("connected")]
    return table([[a["kind"], where(a), a["initiator"], conn(a), _luns(a.get("luns", {}))]
                  for a in r], ["KIND", "WHERE", "INITIATOR", "CONNECTED", "LUNS"])


def _fmt_pr(r: dict) -> str:
    rows = []
    for name, st in r.items():
        keys = ", ".join(f"{g['key']} ({g['initiator']})" for g in st["registrants"]) or "-"
        rows.append([name, st["generation"], "yes" if st["aptpl"] else "no",
                     st["type"] or "-", st["holder"] or "-", keys])
    return table(rows, ["LU", "GENERATION", "APTPL", "TYPE", "HOLDER", "KEYS"])


def _fmt_stats(r: dict) -> str:
    def rows(section: dict) -> list[list[Any]]:
        out = []
        for name, s in section.items():
            c = s["commands"]
            errs = ", ".join(f"{k}={v}" for k, v in s["errors_by_kind"].items()) or "-"
            tmfs = ", ".join(f"{f}={sum(by.values())}" for f, by in
                             s.get("task_management", {}).items()) or "-"
            out.append([name, c["read"], c["write"], c["other"], s["bytes_read"],
                        s["bytes_written"], errs, tmfs])
        return out
    head = ["", "READS", "WRITES", "OTHER", "BYTES READ", "BYTES WRITTEN", "ERRORS", "TMFS"]
    return (table(rows(r["logical_units"]), ["LU", *head[1:]]) + "\n\n"
            + table(rows(r["initiators"]), ["INITIATOR", *head[1:]]))


def _fmt_status(r: dict) -> str:
    parts = [f"bridge pid {r['pid']}, up {r['uptime_s']:.0f} s, control socket {r['control_socket']}",
             "", _fmt_attach_list(r["attachments"]), ""]
    parts.append(table([[lu["name"], _size(lu["size"]), lu["tasks_in_flight"]]
                        for lu in r["logical_units"]], ["LU", "SIZE", "IN FLIGHT"]))
    parts += ["", _fmt_pr(r["reservations"])]
    if r.get("faults"):
        parts += ["", _fmt_faults(r["faults"])]
    if r["unit_attentions"]:
        parts += ["", table([[u["initiator"], u["lu"], " ".join(u["pending"])]
                             for u in r["unit_attentions"]], ["INITIATOR", "LU", "PENDING UA"])]
    return "\n".join(parts)


def _fault_what(f: dict) -> str:
    action = f["action"]
    if "sense_key" in f or "asc" in f or action in ("medium_error", "hardware_error", "not_ready",
                                                    "aborted_command", "check_condition"):
        bits = [f"{k}={f[k]:#04x}" for k in ("sense_key", "asc", "ascq") if k in f]
        return action + (f" ({' '.join(bits)})" if bits else "")
    if action == "delay":
        return f"delay {f['delay_ms']} ms"
    return action + (" (abort fails)" if f.get("abort_fails") else "")


def _fault_match(f: dict) -> str:
    parts = [f["op"]] if "op" in f else []
    if "lba_first" in f:
        parts.append(f"LBA {f['lba_first']}-{f['lba_last']}")
    if "initiator" in f:
        parts.append(f["initiator"])
    if "count" in f:
        parts.append(f"next {f['count']}")
    if "every" in f:
        parts.append(f"every {f['every']}")
    return ", ".join(parts) or "all"


def _fmt_faults(r: list[dict]) -> str:
    if not r:
        return "no fault rules"
    return table([[f["id"], f["lu"], _fault_what(f), _fault_match(f), f["matched"], f["hits"],
                   f["hung"], "spent" if f["spent"] else "active"] for f in r],
                 ["ID", "LU", "ACTION", "MATCHES", "MATCHED", "HITS", "HUNG", "STATE"])


def _fmt_kv(r: Any) -> str:
    if isinstance(r, dict):
        return "\n".join(f"{k}: {json.dumps(v) if isinstance(v, dict | list) else v}"
                         for k, v in r.items())
    return json.dumps(r, indent=2)


# ------------------------------------------------------------------ commands

Command = Callable[[argparse.Namespace], tuple[str, dict[str, Any], Callable[[Any], str]]]


def _lu(args: argparse.Namespace) -> tuple[str, dict[str, Any], Callable[[Any], str]]:
    if args.lu_command == "list":
        return "lu.list", {}, _fmt_lu_list
    if args.lu_command == "add":
        p: dict[str, Any] = {"name": args.name, "path": os.path.abspath(args.path)}
        if args.size is not None:
            p["size"] = int(args.size) if args.size.isdigit() else args.size
        if args.block_size is not None:
            p["block_size"] = args.block_size
        if args.read_only:
            p["read_only"] = True
        for k in ("wwn", "serial"):
            if getattr(args, k) is not None:
                p[k] = getattr(args, k)
        return "lu.add", p, lambda r: _fmt_lu_list([r])
    if args.lu_command == "remove":
        return "lu.remove", {"name": args.name, "force": args.force}, \
            lambda r: f"removed {r['name']}" + "".join(
                f"\nunmapped {m['initiator']} LUN {m['lun']}" for m in r["unmapped"])
    p = {"name": args.name, "force": args.force}
    if args.size is not None:
        p["size"] = int(args.size) if args.size.isdigit() else args.size
    return "lu.resize", p, lambda r: f"{r['name']}: {_size(r['old_size'])} -> {_size(r['size'])}"


def _lun(args: argparse.Namespace) -> tuple[str, dict[str, Any], Callable[[Any], str]]:
    if args.lun_command == "map":
        return "lun.map", {"initiator": args.initiator, "lun": args.lun, "lu": args.lu}, \
            lambda r: f"{r['initiator']} LUN {r['lun']} -> {r['lu']}"
    return "lun.unmap", {"initiator": args.initiator, "lun": args.lun}, \
        lambda r: f"{r['initiator']} LUN {r['lun']} unmapped (was {r['lu']})"


def _lun_pairs(values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        lun, sep, name = v.partition("=")
        if not sep or not lun.isdigit() or not name:
            raise UsageError(f"--lun {v!r}: must be LUN=LU_NAME, e.g. 0=disk0")
        out[lun] = name
    return out


def _attach(args: argparse.Namespace) -> tuple[str, dict[str, Any], Callable[[Any], str]]:
    if args.attach_command == "list":
        return "attach.list", {}, _fmt_attach_list
    if args.attach_command == "add":
        p: dict[str, Any] = {"kind": "vfio_user", "socket": args.socket_path,
                             "luns": _lun_pairs(args.lun or [])}
        for k in ("initiator", "num_queues", "queue_size"):
            if getattr(args, k) is not None:
                p[k] = getattr(args, k)
        return "attach.add", p, lambda r: _fmt_attach_list([r])
    return "attach.remove", {"id": args.id, "force": args.force}, \
        lambda r: f"removed {r['id']} ({r['initiator']})"


def _stats(args: argparse.Namespace) -> tuple[str, dict[str, Any], Callable[[Any], str]]:
    if args.reset:
        return "stats.reset", {}, lambda r: "statistics reset"
    return "stats", {}, _fmt_stats


def _pr(args: argparse.Namespace) -> tuple[str, dict[str, Any], Callable[[Any], str]]:
    if args.pr_command == "show":
        return "pr.show", {"lu": args.lu} if args.lu else {}, _fmt_pr
    return "pr.clear", {"lu": args.lu}, lambda r: _fmt_pr({r["lu"]: r})


def _int(text: str, what: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not a number (decimal or 0x hex)") from None


def _fault(args: argparse.Namespace) -> tuple[str, dict[str, Any], Callable[[Any], str]]:
    if args.fault_command == "list":
        return "fault.list", {}, _fmt_faults
    if args.fault_command == "clear":
        return "fault.clear", {}, lambda r: f"removed {len(r['removed'])} fault rule(s)"
    if args.fault_command == "remove":
        return "fault.remove", {"id": args.id}, \
            lambda r: f"removed fault rule {r['id']} ({r['hits']} hits)"
    p: dict[str, Any] = {"lu": args.lu, "action": args.action}
    if args.lba is not None:
        first, sep, last = args.lba.partition("-")
        p["lba_first"] = _int(first, "--lba")
        p["lba_last"] = _int(last, "--lba") if sep else p["lba_first"]
    if args.sense is not None:
        fields = args.sense.split("/")
        if not 2 <= len(fields) <= 3:
            raise UsageError(f"--sense {args.sense!r}: must be KEY/ASC[/ASCQ] in hex, e.g. 3/11/0")
        try:
            values = [int(x, 16) for x in fields]
        except ValueError:
            raise UsageError(f"--sense {args.sense!r}: must be KEY/ASC[/ASCQ] in hex") from None
        p.update(zip(("sense_key", "asc", "ascq"), values, strict=False))
    for k in ("initiator", "op", "delay_ms", "count", "every"):
        if getattr(args, k) is not None:
            p[k] = getattr(args, k)
    if args.abort_fails:
        p["abort_fails"] = True
    return "fault.add", p, lambda r: _fmt_faults([r])


def _log_level(args: argparse.Namespace) -> tuple[str, dict[str, Any], Callable[[Any], str]]:
    return "log.level", {"level": args.level} if args.level else {}, lambda r: r["level"]


def _save_config(args: argparse.Namespace) -> tuple[str, dict[str, Any], Callable[[Any], str]]:
    p = {"path": os.path.abspath(args.path)} if args.path else {}
    return "config.save", p, lambda r: f"wrote {r['path']}"


def _status(args: argparse.Namespace) -> tuple[str, dict[str, Any], Callable[[Any], str]]:
    return "status", {}, _fmt_status


def _common(p: argparse.ArgumentParser, command: Command) -> None:
    p.add_argument("--socket", "-S", help="control socket of the running bridge")
    p.add_argument("--config", "-c", help="configuration file (its state_dir locates the socket)")
    p.add_argument("--json", action="store_true", help="print the JSON result")
    p.set_defaults(control_command=command)


def register(subparsers: Any, file_status: FileStatus | None = None) -> set[str]:
    """Add the control subcommands to ``vscsi-bridge``'s subparsers; ``file_status(path)``
    is the offline ``status`` (the configuration file and saved state) used when no bridge
    answers. Returns the command names (the main CLI hands those to ``run``)."""
    global _file_status
    _file_status = file_status
    names = set()

    def group(name: str, help: str) -> Any:
        names.add(name)
        return subparsers.add_parser(name, help=help)

    lu = group("lu", "logical units of the running bridge")
    lu_sub = lu.add_subparsers(dest="lu_command", required=True)
    p = lu_sub.add_parser("list", help="list logical units")
    _common(p, _lu)
    p = lu_sub.add_parser("add", help="add an LU (existing image/device, or new sparse image)")
    p.add_argument("name")
    p.add_argument("path")
    p.add_argument("--size", help='create a sparse image of this size ("1GiB") if path is missing')
    p.add_argument("--block-size", type=int, choices=(512, 4096))
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--wwn")
    p.add_argument("--serial")
    _common(p, _lu)
    p = lu_sub.add_parser("remove", help="remove an LU (refused while mapped unless --force)")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="unmap it everywhere first")
    _common(p, _lu)
    p = lu_sub.add_parser("resize", help="grow an LU (shrink with --force); guests are told")
    p.add_argument("name")
    p.add_argument("size", nargs="?", help="new size; omit to re-read a block device's size")
    p.add_argument("--force", action="store_true", help="allow shrinking")
    _common(p, _lu)

    lun = group("lun", "LUN maps of the running bridge (hot-plug)")
    lun_sub = lun.add_subparsers(dest="lun_command", required=True)
    p = lun_sub.add_parser("map", help="map LU at LUN for an attachment's initiator")
    p.add_argument("initiator", help="attachment id, initiator name or socket path")
    p.add_argument("lun", type=int)
    p.add_argument("lu")
    _common(p, _lun)
    p = lun_sub.add_parser("unmap", help="unmap a LUN")
    p.add_argument("initiator")
    p.add_argument("lun", type=int)
    _common(p, _lun)

    att = group("attach", "attachments (vfio-user sockets) of the running bridge")
    att_sub = att.add_subparsers(dest="attach_command", required=True)
    p = att_sub.add_parser("list", help="list attachments")
    _common(p, _attach)
    p = att_sub.add_parser("add", help="serve a new vfio-user socket")
    p.add_argument("socket_path", metavar="SOCKET", help="vfio-user socket (relative: state dir)")
    p.add_argument("--initiator")
    p.add_argument("--num-queues", type=int)
    p.add_argument("--queue-size", type=int)
    p.add_argument("--lun", action="append", metavar="LUN=LU", help="map LU at LUN (repeatable)")
    _common(p, _attach)
    p = att_sub.add_parser("remove", help="stop serving an attachment")
    p.add_argument("id", help="attachment id, initiator name or socket path")
    p.add_argument("--force", action="store_true", help="also with a client connected")
    _common(p, _attach)

    _common(group("status", "live state of the running bridge (else: from the configuration)"),
            _status)
    p = group("stats", "I/O statistics per LU and per initiator")
    p.add_argument("--reset", action="store_true", help="set the counters to zero")
    _common(p, _stats)

    pr = group("pr", "persistent reservations of the running bridge")
    pr_sub = pr.add_subparsers(dest="pr_command", required=True)
    p = pr_sub.add_parser("show", help="keys, reservation, generation, APTPL")
    p.add_argument("lu", nargs="?")
    _common(p, _pr)
    p = pr_sub.add_parser("clear", help="drop every registration and the reservation of an LU")
    p.add_argument("lu")
    _common(p, _pr)

    alua_cli.register(group, _common)  # alua show|set, port down|up
    fault = group("fault", "fault injection rules of the running bridge")
    fault_sub = fault.add_subparsers(dest="fault_command", required=True)
    p = fault_sub.add_parser("add", help="add a rule: matching commands fail, wait or hang")
    p.add_argument("lu", help="logical unit name")
    p.add_argument("action", choices=("medium_error", "hardware_error", "not_ready",
                                      "aborted_command", "check_condition", "busy",
                                      "task_set_full", "delay", "hang"))
    p.add_argument("--initiator", help="only this attachment (id, initiator name or socket)")
    p.add_argument("--op", choices=("read", "write", "other"), help="only this opcode class")
    p.add_argument("--lba", help="only commands touching LBA N or the inclusive range N-M")
    p.add_argument("--sense", help="sense KEY/ASC[/ASCQ] in hex (check_condition; overrides a preset)")
    p.add_argument("--delay-ms", type=int, help="delay: milliseconds before the command runs")
    p.add_argument("--count", type=int, help="only the next N matching commands")
    p.add_argument("--every", type=int, help="only every Nth matching command")
    p.add_argument("--abort-fails", action="store_true",
                   help="hang: ABORT TASK is answered FUNCTION REJECTED (initiators escalate)")
    _common(p, _fault)
    p = fault_sub.add_parser("remove", help="remove a rule (its hung commands go on)")
    p.add_argument("id", type=int)
    _common(p, _fault)
    p = fault_sub.add_parser("list", help="rules with their matched and hit counters")
    _common(p, _fault)
    p = fault_sub.add_parser("clear", help="remove every rule")
    _common(p, _fault)

    p = group("log-level", "read or set the running bridge's log level")
    p.add_argument("level", nargs="?", choices=("debug", "info", "warning", "error"))
    _common(p, _log_level)
    p = group("save-config", "write the running configuration as TOML")
    p.add_argument("path", nargs="?", help="default: the file serve was started with")
    _common(p, _save_config)
    return names


def _error(args: argparse.Namespace, message: str) -> None:
    sub = next((v for k, v in vars(args).items() if k.endswith("_command") and isinstance(v, str)), None)
    print(f"{PROG}: {args.command}{' ' + sub if sub else ''}: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Run one control subcommand parsed by ``register``'s parsers; the exit status."""
    try:
        method, params, fmt = args.control_command(args)
        path = socket_path(args)
    except UsageError as e:
        _error(args, str(e))
        return 2
    try:
        client = BlockingControlClient(path)
    except OSError as e:
        if args.command == "status" and args.config and _file_status is not None:
            rc = _file_status(args.config)
            if rc == 0:  # a failure is its one line alone
                print(f"{PROG}: no bridge answers on {path} ({e.strerror or e}); "
                      f"the state above is from {args.config} and the files next to its images",
                      file=sys.stderr)
            return rc
        _error(args, f"no bridge answers on {path}: {e.strerror or e}")
        return 1
    try:
        with client:
            result = client.call(method, **params)
    except ControlError as e:
        _error(args, e.message)
        return 2 if e.code in _USAGE_CODES else 1
    except (OSError, ValueError) as e:
        _error(args, f"control connection to {path}: {e}")
        return 1
    print(json.dumps(result, indent=2) if args.json else fmt(result))
    return 0
