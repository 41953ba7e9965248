"""Runs one VscsiBackend per vscsi backend directory of the configured domains.

Watches /local/domain/<backend>/backend/vscsi; each <domid>/<devid> found
gets its own task, so that a crash in one backend ends that backend alone
(logged), never the process. A backend that ended is not restarted until its
directory disappears and comes back (a new attach). Nodes left by destroyed
domains are removed (toolstack.reap_destroyed_domains).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import trio

from bridge.scsi.interface import ScsiTarget
from bridge.xen.backend import BackendConfig, VscsiBackend
from bridge.xen.devices import is_ascii_decimal
from bridge.xen.platform import XenPlatform
from bridge.xen.toolstack import attach, reap_destroyed_domains, reap_once
from bridge.xen.xenstore import XenStore, open_dom0_xenstore
from bridge.xen.xs_wire import XenStoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class XenDomainConfig:
    """A guest the bridge serves, by domain name (stable across reboots) or domid."""

    name: str | None = None
    domid: int | None = None
    initiator: str | None = None  # default: iqn.2026-11.org.vscsi-bridge:xen.<name>.<devid>
    devid: int | None = None  # None: every vscsi device of the domain
    luns: tuple[int, ...] = ()  # what auto-attach gives the guest (v-dev 0:0:L//256:L%256)
    relative_port: int | None = None  # the device's target port (bridge/scsi/ports.py)

    def matches(self, domid: int, name: str | None, devid: int) -> bool:
        if self.devid is not None and self.devid != devid:
            return False
        return (self.domid is not None and self.domid == domid) or \
            (self.name is not None and self.name == name)


@dataclass
class XenConfig:
    backend_domid: int = 0
    grant_strategy: str = "auto"
    sg_grant: int = 128
    domains: list[XenDomainConfig] | None = None  # None: every vscsi device of any domain
    reap_destroyed: bool = True
    # Write the vscsi nodes of configured domains (by name) as they appear, e.g. after
    # `xl reboot` recreated the domain under a new domid: no toolstack step needed.
    auto_attach: bool = False
    xenstore_path: str | None = None  # default: xenstored socket, else /dev/xen/xenbus


class XenBackendRunner:
    def __init__(self, xs: XenStore, target: ScsiTarget, platform: XenPlatform,
                 config: XenConfig) -> None:
        self.xs = xs
        self.target = target
        self.platform = platform
        self.config = config
        self.root = f"/local/domain/{config.backend_domid}/backend/vscsi"
        self.running: dict[tuple[int, int], VscsiBackend] = {}
        self.ended: set[tuple[int, int]] = set()
        self.crashes: list[tuple[tuple[int, int], str]] = []
        self.auto_attached: set[tuple[int, int]] = set()

    async def _domain_config(self, domid: int, devid: int) -> XenDomainConfig | None:
        if self.config.domains is None:
            return XenDomainConfig()
        name = await self.xs.read_str(f"/local/domain/{domid}/name")
        for d in self.config.domains:
            if d.matches(domid, name, devid):
                return d
        return None

    async def scan(self, nursery: trio.Nursery) -> None:
        present: set[tuple[int, int]] = set()
        for dom in await self.xs.directory(self.root, missing_ok=True):
            if not is_ascii_decimal(dom):
                continue
            devs = await self.xs.directory(f"{self.root}/{dom}", missing_ok=True)
            for dev in devs:
                if is_ascii_decimal(dev):
                    present.add((int(dom), int(dev)))
        self.ended &= present
        for key in sorted(present - set(self.running) - self.ended):
            dconf = await self._domain_config(*key)
            if dconf is None:
                self.ended.add(key)  # not ours; looked at again only after a re-attach
                continue
            cfg = BackendConfig(sg_grant=self.config.sg_grant,
                                grant_strategy=self.config.grant_strategy,
                                initiator=dconf.initiator, relative_port=dconf.relative_port)
            backend = VscsiBackend(self.xs, self.platform, self.target,
                                   f"{self.root}/{key[0]}/{key[1]}", cfg)
            self.running[key] = backend
            nursery.start_soon(self._run_one, key, backend)

    async def _run_one(self, key: tuple[int, int], backend: VscsiBackend) -> None:
        try:
            await backend.run()
        except Exception as exc:  # one device's failure must not end the others
            log.exception("vscsi backend dom%d/%d crashed; that device is stopped", *key)
            self.crashes.append((key, repr(exc)))
        finally:
            self.running.pop(key, None)
            self.ended.add(key)

    async def auto_attach_once(self) -> list[tuple[int, int]]:
        """Attach configured domains (by name or domid, with ``luns``) that lack their nodes."""
        done = []
        for dom in await self.xs.directory("/local/domain", missing_ok=True):
            if not is_ascii_decimal(dom) or int(dom) == self.config.backend_domid:
                continue
            domid = int(dom)
            name = await self.xs.read_str(f"/local/domain/{domid}/name")
            for d in self.config.domains or []:
                devid = d.devid or 0
                key = (domid, devid)
                if not d.luns or key in self.auto_attached or not d.matches(domid, name, devid):
                    continue
                self.auto_attached.add(key)
                if await self.xs.exists(f"{self.root}/{domid}/{devid}"):
                    continue
                try:
                    await attach(self.xs, domid, devid, list(d.luns), self.config.backend_domid)
                    done.append(key)
                except (ValueError, XenStoreError) as exc:
                    log.warning("auto-attach of dom%d vscsi %d failed: %s", domid, devid, exc)
        return done

    async def _auto_attach_loop(self) -> None:
        async with self.xs.watch("@introduceDomain") as w:
            while True:
                await w.wait()
                for _ in range(3):  # the toolstack writes the name around the introduction
                    await self.auto_attach_once()
                    await trio.sleep(0.5)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if self.config.reap_destroyed:
                await reap_once(self.xs, self.root)
                nursery.start_soon(reap_destroyed_domains, self.xs, self.config.backend_domid)
            if self.config.auto_attach:
                nursery.start_soon(self._auto_attach_loop)
            async with self.xs.watch(self.root) as watch:
                task_status.started()
                while True:
                    fired = await watch.wait()
                    # Only directory-level changes (a device added or removed) need a scan.
                    if any(p.count("/") <= self.root.count("/") + 2 for p in fired):
                        await self.scan(nursery)


def xen_config_from(bridge_config: Any) -> XenConfig:
    """XenConfig from the bridge configuration's [[xen]] attachments (bridge.config.XenAttachment:
    domain name or numeric domid, devid, initiator)."""
    domains = []
    for att in getattr(bridge_config, "xen", []):
        dom = str(att.domain)
        domains.append(XenDomainConfig(name=None if is_ascii_decimal(dom) else dom,
                                       domid=int(dom) if is_ascii_decimal(dom) else None,
                                       initiator=att.initiator, devid=att.devid,
                                       luns=tuple(sorted(getattr(att, "luns", {}))),
                                       relative_port=getattr(att, "relative_port", None) or None))
    return XenConfig(domains=domains)


async def run_xen_backend(target: ScsiTarget, platform: XenPlatform | None = None,
                          config: XenConfig | None = None, xs: XenStore | None = None,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve Xen guests' vscsi devices until cancelled.

    ``platform=None`` uses the real dom0 interfaces (/dev/xen/gntdev,
    /dev/xen/evtchn, the xenstored socket or /dev/xen/xenbus). The bridge's
    configuration becomes a XenConfig through ``xen_config_from``.
    """
    if config is None:
        config = XenConfig()
    if platform is None:
        from bridge.xen.linux_platform import linux_platform

        platform = linux_platform(config.backend_domid)
    if xs is None:
        async with open_dom0_xenstore(config.xenstore_path) as own:
            await XenBackendRunner(own, target, platform, config).run(task_status=task_status)
    else:
        await XenBackendRunner(xs, target, platform, config).run(task_status=task_status)
