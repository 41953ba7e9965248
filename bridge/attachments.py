"""The composition root's attachments: transports created and removed at run time.

``serve`` (bridge/service.py) starts every configured vfio-user attachment through
``Attachments.add_vfio_user`` and hands this object to the control server, which knows
it only as ``bridge.control.host.AttachmentHost`` (the control plane imports no
transport). Each vfio-user attachment runs in its own cancel scope, so ``attach.remove``
stops one socket (its client sees a disconnect, the target an I_T nexus loss) and
nothing else. Xen attachments are listed; adding or removing them at run time is not
supported yet (the Xen runner takes its domains at start).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from bridge.config import BridgeConfig, ConfigError, VfioUserAttachment, parse_config
from bridge.daemon import logs
from bridge.scsi.logical_unit import LogicalUnitSpec
from bridge.scsi.request import InitiatorPort, TargetPort
from bridge.scsi.target import Target

log = logging.getLogger(__name__)


@dataclass
class _Running:
    config: VfioUserAttachment
    device: Any  # VirtioScsiPciDevice
    scope: trio.CancelScope
    done: trio.Event


class Attachments:
    """Implements bridge.control.host.AttachmentHost for ``serve``."""

    def __init__(self, nursery: trio.Nursery, target: Target, config: BridgeConfig,
                 tracer: Callable[[], Callable[[object], None]] | None = None) -> None:
        self._tracer = tracer  # at debug level: a vfio-user message tracer per socket
        self._nursery = nursery
        self._target = target
        self._config = config
        self._vfio: dict[str, _Running] = {}  # by socket path

    # -- vfio-user ------------------------------------------------------------------

    async def add_vfio_user(self, att: VfioUserAttachment) -> None:
        from bridge.vfio_user.server import serve as serve_vfio_user
        from bridge.virtio.scsi_device import VirtioScsiPciDevice

        # Its target port: configured (serve) or a new one with a group of its own (attach.add).
        port = self._target.ports.add_attachment(att.label, att.initiator)
        device = VirtioScsiPciDevice(self._target, InitiatorPort(att.initiator),
                                     num_queues=att.num_queues, queue_size=att.queue_size,
                                     target_port=TargetPort(port.name, port.relative_id),
                                     doorbell=att.doorbell)
        running = _Running(att, device, trio.CancelScope(), trio.Event())

        trace = self._tracer() if self._tracer is not None else None

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with running.scope:
                    await serve_vfio_user(att.socket, device, access=att.access, trace=trace,
                                          task_status=task_status)
            finally:
                device.close()
                running.done.set()

        # Every task started here inherits this: their log lines name the connection.
        token = logs.connection.set((("socket", att.socket), ("initiator", att.initiator)))
        try:
            await self._nursery.start(run)
        except BaseException:
            running.done.set()
            raise
        finally:
            logs.connection.reset(token)
        self._vfio[att.socket] = running
        log.info("serving vfio-user socket %s for %s", att.socket, att.initiator)

    # -- AttachmentHost ---------------------------------------------------------------

    def attachments(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for sock, r in self._vfio.items():
            c = r.config
            out.append({"kind": "vfio_user", "id": f"vfio_user:{sock}", "socket": sock,
                        "initiator": c.initiator, "num_queues": c.num_queues, "doorbell": c.doorbell,
                        "queue_size": c.queue_size,
                        # a vfio-user client is attached while the device has its DMA space
                        "connected": r.device.connected})
        for x in self._config.xen:
            out.append({"kind": "xen", "id": f"xen:{x.domain}.{x.devid}", "domain": x.domain,
                        "devid": x.devid, "initiator": x.initiator, "connected": None})
        return out

    async def add_attachment(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        if kind != "vfio_user":
            raise ValueError(f"kind: {kind!r} attachments cannot be added at run time "
                             "(only vfio_user)")
        cfg = self._parse({"vfio_user": [{**params, "luns": {}}]}, "vfio_user[0].")
        att = cfg.vfio_user[0]
        taken = {a["initiator"] for a in self.attachments()} | \
            {ini for ini, m in self._target.lun_maps().items() if m}
        if att.socket in self._vfio:
            raise ValueError(f"socket: {att.socket} is already served")
        if att.initiator in taken:
            raise ValueError(f"initiator: {att.initiator} is already used")
        await self.add_vfio_user(att)
        return next(a for a in self.attachments() if a["socket"] == att.socket)

    async def remove_attachment(self, key: str) -> dict[str, Any]:
        for sock, r in self._vfio.items():
            if key in (f"vfio_user:{sock}", sock, r.config.initiator):
                entry = next(a for a in self.attachments() if a.get("socket") == sock)
                r.scope.cancel()
                await r.done.wait()
                del self._vfio[sock]
                log.info("vfio-user socket %s removed", sock)
                return entry
        for x in self._config.xen:
            if key in (f"xen:{x.domain}.{x.devid}", x.initiator):
                raise ValueError("Xen attachments cannot be removed at run time; "
                                 "use vscsi-bridge xen detach")
        raise LookupError(f"no attachment {key!r}")

    def lu_spec(self, params: dict[str, Any]) -> LogicalUnitSpec:
        # Alone: whether its image is one a running LU has is the caller's check
        # (by device and inode, bridge/control/methods.py), answered as a refusal.
        return self._parse({"lu": [params]}, "lu[0].", with_running_lus=False).lus[0]

    def _parse(self, sections: dict[str, Any], prefix: str,
               with_running_lus: bool = True) -> BridgeConfig:
        """One section checked exactly as the configuration file's (same messages); the
        running LUs are added so that a new attachment's LUN map can name them."""
        doc = {"bridge": {"state_dir": self._config.state_dir}, **sections}
        doc.setdefault("lu", [])
        if with_running_lus:
            doc["lu"] = doc["lu"] + [{"name": lu.name, "path": lu.spec.path}
                                     for lu in self._target.logical_units()]
        try:
            return parse_config(doc, Path(self._config.state_dir), require_attachments=False)
        except ConfigError as e:
            raise ValueError(str(e).removeprefix(prefix)) from None
