"""Command line: ``vscsi-bridge serve``, ``status``, ``xen attach|detach``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

import trio

from bridge.config import BridgeConfig, ConfigError, demo_config, load_config
from bridge.control import cli as control_cli
from bridge.scsi.reservations_state import ReservationStateError

log = logging.getLogger("bridge")

DEFAULT_CACHE = Path(os.environ.get("VSCSI_CACHE", Path.home() / ".cache" / "vscsi-bridge"))


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _describe(config: BridgeConfig) -> str:
    lines = []
    for lu in config.lus:
        size = f"{lu.size} bytes" if lu.size is not None else "existing size"
        ro = ", read-only" if lu.read_only else ""
        lines.append(f"LU {lu.name}: {lu.path} ({size}, {lu.block_size}-byte blocks{ro})")
    for v in config.vfio_user:
        luns = ", ".join(f"LUN {n} = {name}" for n, name in sorted(v.luns.items()))
        lines.append(f"vfio-user {v.socket}: initiator {v.initiator}: {luns}")
    for x in config.xen:
        luns = ", ".join(f"LUN {n} = {name}" for n, name in sorted(x.luns.items()))
        lines.append(f"xen domain {x.domain} vscsi {x.devid}: initiator {x.initiator}: {luns}")
    return "\n".join(lines)


async def serve(config: BridgeConfig, ready_file: str | None = None,
                config_path: str | None = None) -> None:
    """Run the target core and every configured transport until SIGINT/SIGTERM."""
    from functools import partial

    from bridge.attachments import Attachments
    from bridge.control.server import serve_control
    from bridge.scsi.target import Target

    Path(config.state_dir).mkdir(parents=True, exist_ok=True)
    target = Target(config.lus, config.lun_maps())
    try:
        async with trio.open_nursery() as nursery:
            attachments = Attachments(nursery, target, config)
            for att in config.vfio_user:
                await attachments.add_vfio_user(att)
            if config.xen:
                from bridge.xen.runner import run_xen_backend, xen_config_from

                await nursery.start(run_xen_backend, target, None, xen_config_from(config))
            await nursery.start(partial(serve_control, target, attachments, state_dir=config.state_dir,
                                        log_level=config.log_level, config_path=config_path))
            print(_describe(config), flush=True)
            if ready_file:
                Path(ready_file).write_text("ready\n")
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        target.close()


def _load(args: argparse.Namespace) -> BridgeConfig:
    if args.config:
        return load_config(args.config)
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    return demo_config(cache)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vscsi-bridge",
        description="SCSI target serving KVM guests (virtio-scsi over vfio-user) and Xen guests (vscsiif).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="serve the configured logical units")
    p_serve.add_argument("--config", "-c", help="TOML configuration file (default: a demo configuration)")
    p_serve.add_argument("--cache-dir", default=str(DEFAULT_CACHE / "demo"),
                         help="where the demo configuration keeps its image and socket")
    p_serve.add_argument("--ready-file", help="write this file once every transport listens")
    p_check = sub.add_parser("check-config", help="validate a configuration file and print what it serves")
    p_check.add_argument("config")
    control_commands = control_cli.register(sub, file_status=_file_status)  # incl. live status
    p_xen = sub.add_parser("xen", help="toolstack part for Xen (xl has no vscsi support)")
    xen_sub = p_xen.add_subparsers(dest="xen_command", required=True)
    p_attach = xen_sub.add_parser("attach", help="write a domain's vscsi frontend and backend xenstore nodes")
    p_attach.add_argument("--domid", type=int, required=True)
    p_attach.add_argument("--devid", type=int, default=0)
    p_attach.add_argument("--lun", type=int, action="append", required=True,
                          help="a target LUN to give the guest (repeatable); v-dev 0:0:0:<lun>")
    p_detach = xen_sub.add_parser("detach", help="close a vscsi device and remove its xenstore nodes")
    p_detach.add_argument("--domid", type=int, required=True)
    p_detach.add_argument("--devid", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command in control_commands:
        return control_cli.run(args)
    if args.command == "xen":
        _setup_logging("info")
        return trio.run(_xen_toolstack, args)

    try:
        if args.command == "check-config":
            print(_describe(load_config(args.config)))
            return 0
        config = _load(args)
    except ConfigError as e:
        print(f"vscsi-bridge: configuration error: {e}", file=sys.stderr)
        return 2
    _setup_logging(config.log_level)
    try:
        trio.run(serve, config, args.ready_file, args.config and os.path.abspath(args.config))
    except KeyboardInterrupt:
        pass
    except (OSError, ReservationStateError) as e:
        # A damaged APTPL file stops the bridge: dropping it would silently lose reservations.
        print(f"vscsi-bridge: {e}", file=sys.stderr)
        return 1
    return 0


async def _xen_toolstack(args: argparse.Namespace) -> int:
    from bridge.xen import toolstack
    from bridge.xen.xenstore import connect_xenstored, open_xenstore
    from bridge.xen.xs_wire import XenStoreError

    try:
        async with open_xenstore(await connect_xenstored()) as xs:
            if args.xen_command == "attach":
                await toolstack.attach(xs, args.domid, args.devid, args.lun)
                return 0
            clean = await toolstack.detach(xs, args.domid, args.devid)
            if not clean:
                log.warning("backend of dom%d vscsi %d did not reach Closed; nodes removed anyway",
                            args.domid, args.devid)
            return 0
    except (OSError, ValueError, XenStoreError) as e:
        print(f"vscsi-bridge: xen {args.xen_command}: {e}", file=sys.stderr)
        return 1


def _file_status(config_path: str) -> int:
    """``status`` when no bridge answers on the control socket: from the files."""
    try:
        return _status(load_config(config_path))
    except ConfigError as e:
        print(f"vscsi-bridge: configuration error: {e}", file=sys.stderr)
        return 2


def _status(config: BridgeConfig) -> int:
    """Initiator port names, TransportIDs and persistent-reservation state as stored on disk."""
    out: dict[str, object] = {"initiators": {}, "logical_units": {}}
    for att in [*config.vfio_user, *config.xen]:
        out["initiators"][att.initiator] = {"luns": att.luns}  # type: ignore[index]
    for lu in config.lus:
        pr_path = Path(lu.path + ".pr.json")
        state = json.loads(pr_path.read_text()) if pr_path.exists() else None
        out["logical_units"][lu.name] = {"path": lu.path, "reservations": state}  # type: ignore[index]
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
