"""The toolstack's part of PV-SCSI, which xl/libxl 4.17 lacks: the xenstore nodes.

Nodes and permissions as libxl writes them for other PV devices (and as SUSE's
libxl_vscsi.c writes them for vscsi):
  backend  /local/domain/<be>/backend/vscsi/<domid>/<devid>   perms n<be>, r<domid>
      frontend, frontend-id, online=1, state=1, feature-host=0,
      vscsi-devs/dev-N/{p-dev, p-devname, v-dev, state=1}
  frontend /local/domain/<domid>/device/vscsi/<devid>         perms n<domid>, r<be>
      backend, backend-id, state=1
Removal: online=0 and backend state Closing, wait for Closed, remove both.
LUN hotplug: dev-N state 1 (add) or 5 (remove), then backend state 7.

This module is the one writer of vscsi-devs nodes: the toolstack's entries and
the state steps the backend takes on them (xen-scsiback's scsiback_do_1lun_hotplug
writes dev-N/state too; bridge/xen/backend.py decides, calls set_dev_state).

Usage around xl:  xl create -p guest.cfg; vscsi-bridge xen attach --domid N ...;
xl unpause N.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from bridge.xen.devices import VDev, is_ascii_decimal, parse_pdev, vdev_for_lun
from bridge.xen.xenbus import XenbusState as S
from bridge.xen.xenstore import XenStore
from bridge.xen.xs_wire import Permission, XenStoreError

log = logging.getLogger(__name__)


def backend_path(domid: int, devid: int, backend_domid: int = 0) -> str:
    return f"/local/domain/{backend_domid}/backend/vscsi/{domid}/{devid}"


def frontend_path(domid: int, devid: int) -> str:
    return f"/local/domain/{domid}/device/vscsi/{devid}"


@dataclass(frozen=True)
class VDevSpec:
    """One LUN of a vscsi device: the target LUN and the guest's "h:c:t:l" for it."""

    lun: int
    vdev: str | None = None

    def resolved(self, host: int = 0) -> VDev:
        if self.vdev is None:
            return vdev_for_lun(self.lun, host)
        return VDev.from_text(self.vdev)


def _specs(vdevs: Sequence[int | VDevSpec | tuple[int, str]]) -> list[VDevSpec]:
    out = []
    for v in vdevs:
        if isinstance(v, VDevSpec):
            out.append(v)
        elif isinstance(v, tuple):
            out.append(VDevSpec(v[0], v[1]))
        else:
            out.append(VDevSpec(int(v)))
    nexuses = [s.resolved().nexus for s in out]
    if len(set(nexuses)) != len(nexuses):
        raise ValueError("two LUNs share a v-dev channel:target:lun")
    return out


@dataclass(frozen=True)
class DevEntry:
    """One vscsi-devs/dev-N entry as read (None: missing or not parseable)."""

    name: str
    state: int | None
    vdev: VDev | None
    lun: int | None  # target LUN from p-dev


# A dev entry in one of these states is offered or in use (not being removed).
LIVE_DEV_STATES = (S.INITIALISING, S.INITIALISED, S.CONNECTED)


async def read_devs(xs: XenStore, be: str, tx: int = 0) -> list[DevEntry]:
    out = []
    for name in await xs.directory(f"{be}/vscsi-devs", tx, missing_ok=True):
        base = f"{be}/vscsi-devs/{name}"
        out.append(DevEntry(name, await xs.read_int(f"{base}/state", None, tx),
                            VDev.parse(await xs.read_str(f"{base}/v-dev", "", tx) or ""),
                            parse_pdev(await xs.read_str(f"{base}/p-dev", "", tx) or "")))
    return out


async def set_dev_state(xs: XenStore, be: str, name: str, state: S, tx: int = 0) -> None:
    await xs.write(f"{be}/vscsi-devs/{name}/state", str(int(state)), tx)


async def remove_dev(xs: XenStore, be: str, name: str) -> None:
    await xs.rm(f"{be}/vscsi-devs/{name}")


async def _write_dev(xs: XenStore, be: str, index: int, spec: VDevSpec, host: int,
                     tx: int) -> None:
    base = f"{be}/vscsi-devs/dev-{index}"
    await xs.write(f"{base}/p-dev", str(spec.lun), tx)
    await xs.write(f"{base}/p-devname", f"vscsi-bridge-lun{spec.lun}", tx)
    await xs.write(f"{base}/v-dev", str(spec.resolved(host)), tx)
    await set_dev_state(xs, be, f"dev-{index}", S.INITIALISING, tx)


async def attach(xs: XenStore, domid: int, devid: int,
                 vdevs: Sequence[int | VDevSpec | tuple[int, str]],
                 backend_domid: int = 0) -> None:
    """Write the frontend and backend nodes of vscsi device ``devid`` of ``domid``."""
    specs = _specs(vdevs)
    be = backend_path(domid, devid, backend_domid)
    fe = frontend_path(domid, devid)
    if not await xs.exists(f"/local/domain/{domid}"):
        raise ValueError(f"domain {domid} does not exist in xenstore")
    be_perms = [Permission(backend_domid, "n"), Permission(domid, "r")]
    fe_perms = [Permission(domid, "n"), Permission(backend_domid, "r")]

    async def body(tx: int) -> None:
        await xs.rm(be, tx)
        await xs.rm(fe, tx)
        await xs.mkdir(be, tx)
        await xs.set_perms(be, be_perms, tx)
        await xs.mkdir(fe, tx)
        await xs.set_perms(fe, fe_perms, tx)
        # Children created below inherit the directory's permissions.
        await xs.write(f"{fe}/backend", be, tx)
        await xs.write(f"{fe}/backend-id", str(backend_domid), tx)
        await xs.write(f"{fe}/state", str(int(S.INITIALISING)), tx)
        await xs.write(f"{be}/frontend", fe, tx)
        await xs.write(f"{be}/frontend-id", str(domid), tx)
        await xs.write(f"{be}/online", "1", tx)
        await xs.write(f"{be}/feature-host", "0", tx)
        for i, spec in enumerate(specs):
            await _write_dev(xs, be, i, spec, 0, tx)
        await xs.write(f"{be}/state", str(int(S.INITIALISING)), tx)

    await xs.transact(body)
    log.info("attached vscsi %d of dom%d: LUNs %s", devid, domid, [s.lun for s in specs])


async def _wait_state(xs: XenStore, path: str, states: Sequence[int], timeout: float) -> bool:
    with trio.move_on_after(timeout):
        async with xs.watch(path) as w:
            while True:
                st = await xs.read_int(path)
                if st is None or st in states:
                    return True
                await w.wait()
    return False


async def detach(xs: XenStore, domid: int, devid: int, backend_domid: int = 0,
                 timeout: float = 10.0) -> bool:
    """Close the device (online=0, Closing, wait Closed) and remove both directories.

    Returns False when the backend did not reach Closed in time (the nodes are
    removed anyway, as ``xl`` does with force).
    """
    be = backend_path(domid, devid, backend_domid)
    fe = frontend_path(domid, devid)
    clean = True
    if await xs.exists(be):
        await xs.write(f"{be}/online", "0")
        state = await xs.read_int(f"{be}/state", 0)
        fe_state = await xs.read_int(f"{fe}/state", 0)
        if state not in (S.CLOSED, S.UNKNOWN) and fe_state not in (S.UNKNOWN, S.INITIALISING):
            await xs.write(f"{be}/state", str(int(S.CLOSING)))
            clean = await _wait_state(xs, f"{be}/state", (S.CLOSED,), timeout)
    await xs.rm(fe)
    await xs.rm(be)
    return clean


async def hotplug_lun(xs: XenStore, domid: int, devid: int, spec: int | VDevSpec,
                      add: bool, backend_domid: int = 0) -> bool:
    """Add (dev state 1) or remove (dev state 5) one LUN of a running device, then state 7.

    False when there was nothing to do (already offered, or not there to remove)."""
    (s,) = _specs([spec])
    return await reconfigure(xs, backend_path(domid, devid, backend_domid), [(s, add)])


async def reconfigure(xs: XenStore, be: str, changes: Sequence[tuple[VDevSpec, bool]]) -> bool:
    """LUN hot-plug of a connected device in one transaction: a new dev-N at state 1 for
    each LUN added that has no live entry, state 5 on the live entries of each LUN removed,
    and backend state Reconfiguring if anything was written (returned). A v-dev not given
    takes the host number of the existing entries (xen-scsiback ignores it)."""

    async def body(tx: int) -> bool:
        devs = await read_devs(xs, be, tx)
        used = [int(d.name[4:]) for d in devs
                if d.name.startswith("dev-") and is_ascii_decimal(d.name[4:])]
        next_index = max(used, default=-1) + 1
        host = next((d.vdev.host for d in devs if d.vdev is not None), 0)
        touched = False
        for spec, add in changes:
            live = [d.name for d in devs if d.lun == spec.lun and d.state in LIVE_DEV_STATES]
            if add and not live:
                await _write_dev(xs, be, next_index, spec, host, tx)
                next_index += 1
                touched = True
            elif not add:
                for name in live:
                    await set_dev_state(xs, be, name, S.CLOSING, tx)
                    touched = True
        if touched:
            await xs.write(f"{be}/state", str(int(S.RECONFIGURING)), tx)
        return touched

    return await xs.transact(body)


async def reap_destroyed_domains(xs: XenStore, backend_domid: int = 0) -> None:
    """Remove vscsi backend nodes of domains that no longer exist (watch @releaseDomain).

    ``xl destroy`` removes /local/domain/<domid> but leaves our backend
    directory behind at state 6; this runs forever.
    """
    root = f"/local/domain/{backend_domid}/backend/vscsi"
    async with xs.watch("@releaseDomain") as w:
        while True:
            await w.wait()
            await reap_once(xs, root)


async def reap_once(xs: XenStore, root: str) -> list[int]:
    gone = []
    for d in await xs.directory(root, missing_ok=True):
        if not is_ascii_decimal(d):
            continue
        if not await xs.exists(f"/local/domain/{d}"):
            try:
                await xs.rm(f"{root}/{d}")
                gone.append(int(d))
                log.info("removed vscsi backend nodes of destroyed dom%s", d)
            except XenStoreError as exc:
                log.warning("cannot remove %s/%s: %s", root, d, exc)
    return gone
