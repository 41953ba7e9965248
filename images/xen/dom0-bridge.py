"""dom0 helper: run the bridge's Xen backend from the checkout under test (/vscsi/src).

Copied into each run directory by harness/xen.py; lib.sh wraps it
(bridge_attach, bridge_start, bridge_stop). Two commands:

  attach --domid N [--devid D] --lun L[:h:c:t:l] ...   write the vscsi xenstore nodes with the
      bridge's own toolstack code (bridge.xen.toolstack.attach), as `vscsi-bridge xen attach` would.
  serve --image PATH --size BYTES --domain NAME [--lun L ...] [--grant-strategy S]
      one LU "disk0" on PATH, LUNs mapped for NAME's initiator, served by
      bridge.xen.runner.run_xen_backend on the real /dev/xen/* until SIGTERM/SIGINT.
      Writes --ready FILE once the backend watches xenstore.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import logging
import os
import signal
import sys
import time

sys.path.insert(0, os.environ.get("VSCSI_SRC", "/vscsi/src"))

import trio  # noqa: E402

log = logging.getLogger("dom0-bridge")


async def attach(args: argparse.Namespace) -> None:
    from bridge.xen.toolstack import VDevSpec
    from bridge.xen.toolstack import attach as ts_attach
    from bridge.xen.xenstore import connect_xenstored, open_xenstore

    specs = []
    for item in args.lun:
        lun, _, vdev = item.partition(":")
        specs.append(VDevSpec(int(lun), vdev or None))
    async with open_xenstore(await connect_xenstored()) as xs:
        await ts_attach(xs, args.domid, args.devid, specs)
    print(f"dom0-bridge: attached vscsi {args.devid} of dom{args.domid}: {args.lun}", flush=True)


async def serve(args: argparse.Namespace) -> None:
    from bridge.target.logical_unit import LogicalUnitSpec
    from bridge.target.target import Target
    from bridge.xen.devices import initiator_name
    from bridge.xen.runner import XenConfig, XenDomainConfig, run_xen_backend

    initiator = initiator_name(args.domain, 0, args.devid)
    spec = LogicalUnitSpec(name="disk0", path=args.image, size=args.size)
    target = Target([spec], {initiator: {lun: "disk0" for lun in args.lun}})
    config = XenConfig(
        grant_strategy=args.grant_strategy,
        domains=[XenDomainConfig(name=args.domain, initiator=initiator)],
    )
    started = time.monotonic()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_xen_backend, target, None, config)
            print(f"dom0-bridge: serving {args.image} to {args.domain} as {initiator}", flush=True)
            if args.ready:
                with open(args.ready, "w") as f:
                    f.write("ready\n")
            # SIGUSR1: Python stacks of every thread (even with the trio loop blocked);
            # SIGUSR2: each backend's ring indexes, requests in flight and counters.
            faulthandler.register(signal.SIGUSR1, all_threads=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM,
                                           signal.SIGUSR2) as signals:
                async for signum in signals:
                    if signum == signal.SIGUSR2:
                        _dump_backends()
                        continue
                    nursery.cancel_scope.cancel()
                    break
    finally:
        target.close()
        print(f"dom0-bridge: stopped after {time.monotonic() - started:.1f} s", flush=True)


def _dump_backends() -> None:
    from bridge.xen.backend import VscsiBackend

    for obj in gc.get_objects():
        if isinstance(obj, VscsiBackend):
            conn = obj.conn
            ring = conn.ring.indexes() if conn is not None else None
            print(f"dom0-bridge: {obj.be}: stats {obj.stats} ring {ring} "
                  f"inflight {dict(conn.inflight) if conn else None} "
                  f"idle {conn.idle_wait is not None if conn else None}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="dom0-bridge")
    parser.add_argument("--log-level", default="info")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("attach")
    p.add_argument("--domid", type=int, required=True)
    p.add_argument("--devid", type=int, default=0)
    p.add_argument("--lun", action="append", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--image", required=True)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--domain", required=True)
    p.add_argument("--devid", type=int, default=0)
    p.add_argument("--lun", type=int, action="append", default=None)
    p.add_argument("--grant-strategy", default="map")
    p.add_argument("--ready")
    args = parser.parse_args()
    if args.command == "serve" and not args.lun:
        args.lun = [0]
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    trio.run(attach if args.command == "attach" else serve, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
