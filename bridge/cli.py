"""Command line: ``vscsi-bridge serve``, ``check-config``, ``qemu-args``, ``xen``, and the
control commands of a running bridge (bridge/control/cli.py: ``status``, ``lu``, ``lun``, ...).

This is the boundary where failures become what the operator reads: one line per
problem on stderr, ``vscsi-bridge: ...``, exit status 2 for the configuration and 1 for
the environment, never a traceback (exception groups from trio are looked through).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib import metadata
from pathlib import Path

import trio

from bridge.config import BridgeConfig, ConfigError, ConfigErrors, demo_config, load_config
from bridge.control import cli as control_cli
from bridge.daemon.logs import FORMATS, LEVELS, setup_logging
from bridge.startup import EXIT_CONFIG, EXIT_ENVIRONMENT, StartupError

log = logging.getLogger("bridge")

PROG = "vscsi-bridge"


def _cache_dir() -> Path:
    return Path(os.environ.get("VSCSI_CACHE") or Path.home() / ".cache" / "vscsi-bridge")


def version() -> str:
    try:
        return metadata.version("vscsi-bridge")
    except metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "0.1.0+checkout"


def _print_errors(lines: list[str]) -> None:
    for line in lines:
        print(f"{PROG}: {line}", file=sys.stderr)


def _config_error_lines(e: ConfigError) -> list[str]:
    errors = e.errors if isinstance(e, ConfigErrors) else [e]
    return [f"configuration error: {err}" for err in errors]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="SCSI target serving KVM guests (virtio-scsi over vfio-user) and Xen guests (vscsiif).",
        epilog="Exit status: 0 success, 1 the host is not as the configuration needs (lock held, "
               "device missing, socket in use), 2 configuration error.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p_serve = sub.add_parser("serve", help="serve the configured logical units until SIGINT/SIGTERM")
    source = p_serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", "-c", help="TOML configuration file")
    source.add_argument("--demo", action="store_true",
                        help="serve the demo configuration: a sparse 1 GiB image in --cache-dir, "
                             "one vfio-user socket <cache-dir>/run/demo.sock")
    p_serve.add_argument("--cache-dir", default=None,
                         help="where --demo keeps its image and socket (default $VSCSI_CACHE/demo, "
                              "$VSCSI_CACHE defaulting to ~/.cache/vscsi-bridge)")
    p_serve.add_argument("--ready-file", help="write this file once every transport listens")
    p_serve.add_argument("--log-level", choices=LEVELS,
                         help="overrides bridge.log_level (debug adds each guest's vfio-user messages)")
    p_serve.add_argument("--log-format", choices=FORMATS,
                         help="overrides bridge.log_format: text lines, or one JSON object per line")

    p_check = sub.add_parser("check-config", help="check a configuration without serving; list every "
                                                  "problem, or print what would be served")
    p_check.add_argument("config", help="TOML configuration file to check")

    # lu, lun, attach, status (live, else from the files), stats, pr, log-level, save-config
    control_cli.register(sub, file_status=_file_status)

    p_qemu = sub.add_parser("qemu-args", help="print the QEMU options that attach a guest to a "
                                              "configured vfio-user socket")
    p_qemu.add_argument("--config", "-c", required=True, help="TOML configuration file")
    p_qemu.add_argument("--socket", help="which [[vfio_user]] socket (path or file name); "
                                         "needed when there are several")
    p_qemu.add_argument("--mem", default="512M",
                        help="guest RAM, also the size of the shared memfd backend (default 512M)")
    p_qemu.add_argument("--id", default="vscsi0", help="QEMU device id (default vscsi0)")

    p_xen = sub.add_parser("xen", help="toolstack part for Xen (xl has no vscsi support)")
    xen_sub = p_xen.add_subparsers(dest="xen_command", required=True)
    p_attach = xen_sub.add_parser("attach", help="write a domain's vscsi frontend and backend xenstore nodes")
    p_detach = xen_sub.add_parser("detach", help="close a vscsi device and remove its xenstore nodes")
    for p in (p_attach, p_detach):
        who = p.add_mutually_exclusive_group(required=True)
        who.add_argument("--domain", help="the domain, by name (as `xl list` shows it) or domid")
        who.add_argument("--domid", type=int, help="the domain's numeric id (changes when it is recreated)")
        p.add_argument("--devid", type=int, default=0,
                       help="the domain's vscsi device (vhost) number, default 0")
    p_attach.add_argument("--lun", type=int, action="append", required=True,
                          help="a target LUN to give the guest (repeatable); the guest sees LUN L as "
                               "v-dev 0:0:L//256:L%%256, i.e. 0:0:0:L below 256")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "xen":
            setup_logging("info")
            return trio.run(_xen_toolstack, args)
        if args.command == "check-config":
            return _check_config(args.config)
        if args.command == "qemu-args":
            return _qemu_args(load_config(args.config), args)
        if args.command == "serve":
            return _serve(args)
        return control_cli.run(args)
    except ConfigError as e:
        _print_errors(_config_error_lines(e))
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 0
    except BaseException as e:  # the boundary: explain it in one line, or re-raise a real bug
        reason = explain(e)
        if reason is None:
            raise
        _print_errors([reason.message])
        return reason.exit_code


def _serve(args: argparse.Namespace) -> int:
    if args.demo:
        cache = Path(args.cache_dir) if args.cache_dir else _cache_dir() / "demo"
        cache.mkdir(parents=True, exist_ok=True)
        config = demo_config(cache)
    else:
        config = load_config(args.config)
    setup_logging(args.log_level or config.log_level, args.log_format or config.log_format)
    from bridge.service import serve

    trio.run(serve, config, args.ready_file, None, args.config and os.path.abspath(args.config))
    return 0


def _check_config(path: str) -> int:
    """Every problem, one per line; exit 2 if any is in the file, 1 if only the host lacks
    something; else what would be served on stdout and any warnings on stderr."""
    from bridge.service import describe, environment_problems

    config = load_config(path)
    _print_errors([f"warning: {w}" for w in config.warnings])
    problems = environment_problems(config)
    print(describe(config))
    if problems:
        _print_errors(problems)
        return EXIT_ENVIRONMENT
    return 0


def _qemu_args(config: BridgeConfig, args: argparse.Namespace) -> int:
    from bridge.qemu_args import shell_lines, vfio_user_args

    atts = config.vfio_user
    if args.socket:
        atts = [a for a in atts if args.socket in (a.socket, Path(a.socket).name)]
    if len(atts) != 1:
        names = ", ".join(a.socket for a in config.vfio_user) or "none configured"
        what = f"no [[vfio_user]] socket {args.socket!r}" if args.socket else "several [[vfio_user]] sockets"
        raise StartupError(f"qemu-args: {what}; choose one with --socket ({names})", EXIT_CONFIG)
    print(shell_lines(vfio_user_args(atts[0].socket, args.mem, args.id)))
    return 0


async def _xen_toolstack(args: argparse.Namespace) -> int:
    from bridge.xen import toolstack
    from bridge.xen.xenstore import open_dom0_xenstore
    from bridge.xen.xs_wire import XenStoreError

    try:
        async with open_dom0_xenstore() as xs:
            domid = args.domid if args.domid is not None else await _resolve_domain(xs, args.domain)
            if args.xen_command == "attach":
                await toolstack.attach(xs, domid, args.devid, args.lun)
                return 0
            clean = await toolstack.detach(xs, domid, args.devid)
            if not clean:
                log.warning("backend of dom%d vscsi %d did not reach Closed; nodes removed anyway",
                            domid, args.devid)
            return 0
    except (OSError, ValueError, XenStoreError) as e:
        raise StartupError(f"xen {args.xen_command}: {e}") from None


async def _resolve_domain(xs: object, domain: str) -> int:
    """A domain name (as xl shows it) or a domid given as text, to the current domid."""
    if domain.isdigit():
        return int(domain)
    for dom in await xs.directory("/local/domain", missing_ok=True):  # type: ignore[attr-defined]
        if dom.isdigit() and await xs.read_str(f"/local/domain/{dom}/name") == domain:  # type: ignore[attr-defined]
            return int(dom)
    raise StartupError(f"xen: no running domain named {domain!r} (see `xl list`)")


def _file_status(config_path: str) -> int:
    """``status`` when no bridge answers on the control socket: from the files (one line
    per problem, as everywhere at this boundary)."""
    try:
        return _status(load_config(config_path))
    except ConfigError as e:
        _print_errors(_config_error_lines(e))
        return EXIT_CONFIG
    except BaseException as e:
        reason = explain(e)
        if reason is None:
            raise
        _print_errors([reason.message])
        return reason.exit_code


def _status(config: BridgeConfig) -> int:
    """Initiator port names, TransportIDs and persistent-reservation state as stored on disk."""
    from bridge.scsi.reservations.state import load_state, state_path_for

    out: dict[str, object] = {"initiators": {}, "logical_units": {}}
    for att in [*config.vfio_user, *config.xen]:
        out["initiators"][att.initiator] = {"luns": att.luns}  # type: ignore[index]
    for lu in config.lus:
        pr_path = state_path_for(lu.path)
        # load_state refuses a damaged file with the same one-line reason serve gives.
        state = json.loads(Path(pr_path).read_text()) if load_state(pr_path) is not None else None
        out["logical_units"][lu.name] = {"path": lu.path, "reservations": state}  # type: ignore[index]
    print(json.dumps(out, indent=2))
    return 0



def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for sub in exc.exceptions:
            out.extend(_leaves(sub))
        return out
    return [exc]


def explain(exc: BaseException) -> StartupError | None:
    """The StartupError an exception (or a group of them) stands for, None if it is a bug.

    Known kinds from the layers below are translated: a damaged reservation file, an OS
    error naming a file, a core ValueError about an image.
    """
    from bridge.config import ConfigError
    from bridge.scsi.reservations import ReservationStateError

    for leaf in _leaves(exc):
        if isinstance(leaf, StartupError):
            return leaf
        if isinstance(leaf, ConfigError):
            return StartupError(f"configuration error: {leaf}", EXIT_CONFIG)
        if isinstance(leaf, ReservationStateError):
            # A damaged APTPL file stops the bridge: dropping it would silently lose reservations.
            return StartupError(f"{leaf}; move it away or repair it to start", EXIT_ENVIRONMENT)
        if isinstance(leaf, json.JSONDecodeError):
            return StartupError(f"damaged JSON: {leaf}", EXIT_ENVIRONMENT)
        if isinstance(leaf, OSError):
            where = f"{leaf.filename}: " if leaf.filename else ""
            return StartupError(f"{where}{leaf.strerror or leaf}", EXIT_ENVIRONMENT)
        if isinstance(leaf, ValueError) and str(leaf).startswith(("path:", "size:", "block_size:")):
            return StartupError(f"logical unit: {leaf}", EXIT_CONFIG)
    return None

if __name__ == "__main__":
    sys.exit(main())
