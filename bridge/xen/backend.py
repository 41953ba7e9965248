"""One vscsi backend device (one frontend vhost of one domain), as xen-scsiback runs it.

Xenbus: level-triggered; each wake-up (a watch on both state nodes, or a
target event) reads both states and the facts, and performs the transition
that bridge/xen/xenbus_state.py's table gives (the decisions live there; this
module only performs them). LUN hot-plug from the target (LunAdded/LunRemoved
for this initiator) goes through toolstack.reconfigure, as an operator's
hot-plug does: dev-N state 1 / state 5, then Reconfiguring.

The ring of a connected frontend is served by ring_service.RingService; a
broken ring disconnects this device alone (Closing, with a log line).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from bridge.ratelimit import guest_error_log
from bridge.scsi.events import LunAdded, LunRemoved
from bridge.scsi.interface import ScsiTarget
from bridge.scsi.request import InitiatorPort, TargetPort
from bridge.xen import toolstack, xenbus_state
from bridge.xen.datapath import DataPath, make_datapath
from bridge.xen.devices import initiator_name
from bridge.xen.platform import GrantError, XenPlatform
from bridge.xen.ring import BackRing
from bridge.xen.ring_service import RingService
from bridge.xen.xenbus import XenbusState as S
from bridge.xen.xenbus_state import Action
from bridge.xen.xenstore import XenStore

log = logging.getLogger(__name__)


@dataclass
class BackendConfig:
    # Linux scsiback publishes SG_ALL (128); scsifront then uses up to 128 segments.
    sg_grant: int = 128
    grant_strategy: str = "auto"  # "auto" (copy small, map large), "map" or "copy" (datapath.py)
    initiator: str | None = None  # overrides the name derived from the domain name
    relative_port: int | None = None  # this device's target port (bridge/scsi/ports.py)


class VscsiBackend:
    def __init__(self, xs: XenStore, platform: XenPlatform, target: ScsiTarget,
                 be_path: str, config: BackendConfig | None = None,
                 datapath: DataPath | None = None) -> None:
        self.xs = xs
        self.platform = platform
        self.target = target
        self.be = be_path
        self.config = config or BackendConfig()
        self.datapath = datapath or make_datapath(self.config.grant_strategy, platform.grants)
        self.devid = int(be_path.rsplit("/", 1)[1])
        self.domid = -1
        self.fe = ""
        self.initiator = InitiatorPort("")
        self.luns: dict[tuple[int, int, int], int] = {}  # (channel, id, lun) -> target LUN
        self.conn: RingService | None = None
        self._pending: dict[int, bool] = {}  # target LUN -> added (else removed)
        self._latched_close = False
        self._tags = itertools.count(1)
        self._watch: Any = None
        self._nursery: trio.Nursery | None = None
        self.guest_log = guest_error_log(log)  # this device's frontend's errors, rate-limited
        self.stats = {"requests": 0, "errors": 0, "notifies": 0, "connects": 0,
                      "lost_wakeups": 0}

    # ---- lifecycle ------------------------------------------------------------
    async def run(self) -> None:
        domid = await self.xs.read_int(f"{self.be}/frontend-id")
        fe = await self.xs.read_str(f"{self.be}/frontend")
        if domid is None or not fe:
            log.error("%s: no frontend-id/frontend node, not serving", self.be)
            return
        self.domid, self.fe = domid, fe
        name = await self.xs.read_str(f"/local/domain/{domid}/name")
        self.initiator = InitiatorPort(self.config.initiator
                                       or initiator_name(name, domid, self.devid))
        log.info("%s: serving dom%d (%s) as %s", self.be, domid, name, self.initiator.name)
        self._token = trio.lowlevel.current_trio_token()
        self.target.subscribe(self._on_target_event)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                async with self.xs.watch(f"{self.fe}/state", f"{self.be}/state") as watch:
                    self._watch = watch
                    await self._probe()
                    while await self._step():
                        await watch.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._watch = None
            self.target.unsubscribe(self._on_target_event)
            with trio.CancelScope(shield=True):
                await self._disconnect()
            log.info("%s: backend stopped", self.be)

    def _on_target_event(self, event: object) -> None:
        if self._watch is None or not isinstance(event, LunAdded | LunRemoved):
            return
        if event.initiator != self.initiator.name:
            return
        add = isinstance(event, LunAdded)
        try:
            trio.lowlevel.current_task()
        except RuntimeError:  # emitted from another thread: hand it to the trio loop
            self._token.run_sync_soon(self._queue_hotplug, event.lun, add)
            return
        self._queue_hotplug(event.lun, add)

    def _queue_hotplug(self, lun: int, add: bool) -> None:
        self._pending[lun] = add
        if self._watch is not None:
            self._watch.poke("target-event")

    async def _probe(self) -> None:
        be_state = await self.xs.read_int(f"{self.be}/state", 0)
        fe_state = await self.xs.read_int(f"{self.fe}/state", 0)
        assert be_state is not None and fe_state is not None
        await self._apply(xenbus_state.start(be_state, fe_state), be_state)

    async def _step(self) -> bool:
        """One reconciliation; False when the backend directory is gone or detached."""
        be_state = await self.xs.read_int(f"{self.be}/state")
        if be_state is None:
            return False
        fe_state = await self.xs.read_int(f"{self.fe}/state", 0)
        assert fe_state is not None
        log.debug("%s: step: frontend %s backend %s", self.be, fe_state, be_state)
        facts = xenbus_state.Facts(
            online=await self.xs.read_int(f"{self.be}/online", 1) != 0,
            connected=self.conn is not None,
            broken=self.conn is not None and self.conn.broken is not None,
            latched_close=self._latched_close,
            hotplug_pending=bool(self._pending))
        if facts.broken:
            assert self.conn is not None
            self.guest_log.error("%s: dom%d: %s; disconnecting this device", self.be,
                                 self.domid, self.conn.broken)
        return await self._apply(xenbus_state.step(be_state, fe_state, facts), be_state)

    async def _apply(self, t: xenbus_state.Transition, be_state: int) -> bool:
        """Perform a transition of xenbus_state; False when it stops the backend."""
        if t.note:
            log.log(t.level, "%s: %s", self.be, t.note)
        for action in t.actions:
            if not await self._perform(action):
                return await self._apply(xenbus_state.CONNECT_FAILED, be_state)
        if t.latch is not None:
            self._latched_close = t.latch
        if t.state is not None and t.state != be_state:
            await self.xs.write(f"{self.be}/state", str(int(t.state)))
        return not t.stop

    async def _perform(self, action: Action) -> bool:
        """One action; False only when CONNECT failed."""
        perform: dict[Action, Callable[[], Awaitable[bool | None]]] = {  # one per Action
            Action.CONNECT: self._connect,
            Action.DISCONNECT: self._disconnect,
            Action.OFFER_FEATURES: self._offer_features,
            Action.REOFFER_DEVS: self._reset_devs,
            Action.ADD_OR_DEL_LUNS: self._hotplug_apply,
            Action.UPDATE_DEV_STATES: self._update_dev_states,
            Action.REMOVE_CLOSED_DEVS: self._remove_closed_devs,
            Action.START_RECONFIGURATION: self._start_reconfiguration,
        }
        return await perform[action]() is not False

    async def _offer_features(self) -> None:
        await self.xs.write(f"{self.be}/feature-sg-grant", str(self.config.sg_grant))

    # ---- connection -----------------------------------------------------------
    async def _connect(self) -> bool:
        ring_ref = await self.xs.read_int(f"{self.fe}/ring-ref")
        port = await self.xs.read_int(f"{self.fe}/event-channel")
        if ring_ref is None or port is None:
            self.guest_log.error("%s: frontend Initialised without ring-ref/event-channel",
                                 self.be)
            return False
        try:
            mapping = self.platform.grants.map(self.domid, [ring_ref], True)
        except GrantError as exc:
            self.guest_log.error("%s: cannot map ring-ref %d: %s", self.be, ring_ref, exc)
            return False
        try:
            evtchn = self.platform.evtchn.bind_interdomain(self.domid, port)
        except OSError as exc:
            self.guest_log.error("%s: cannot bind event-channel %d: %s", self.be, port, exc)
            mapping.close()
            return False
        conn = RingService(BackRing(mapping.pages[0]), mapping, evtchn, target=self.target,
                           datapath=self.datapath, initiator=self.initiator, domid=self.domid,
                           luns=self.luns, sg_grant=self.config.sg_grant, tags=self._tags,
                           stats=self.stats, name=self.be, on_broken=self._ring_broken,
                           target_port=None if self.config.relative_port is None else
                           TargetPort(self.be, self.config.relative_port),
                           guest_log=self.guest_log)
        self.conn = conn
        self.stats["connects"] += 1
        assert self._nursery is not None
        self._nursery.start_soon(conn.serve)
        log.info("%s: connected ring-ref %d event-channel %d (local port %d)", self.be,
                 ring_ref, port, evtchn.port)
        return True

    async def _disconnect(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        await conn.close()
        # SAM-5 6.3.4: the transport connection is gone, an I_T nexus loss.
        try:
            self.target.nexus_loss(self.initiator.name)
        except Exception:
            log.exception("%s: nexus loss", self.be)

    def _ring_broken(self) -> None:
        if self._watch is not None:
            self._watch.poke("broken")

    # ---- LUN hotplug (the vscsi-devs nodes are written by toolstack.py) ------
    async def _hotplug_apply(self) -> None:
        """VSCSIBACK_OP_ADD_OR_DEL_LUN: devs 1 -> 3 (or 6 if refused), 5 -> 6."""
        allowed = set(self.target.luns_for(self.initiator.name))
        for dev in await toolstack.read_devs(self.xs, self.be):
            vdev, pdev = dev.vdev, dev.lun
            if dev.state == S.INITIALISING:
                if vdev is None or pdev is None or pdev not in allowed or \
                        self.luns.get(vdev.nexus, pdev) != pdev:
                    log.warning("%s: %s refused (v-dev %s, LUN %s not mapped for %s)", self.be,
                                dev.name, vdev, pdev, self.initiator.name)
                    await toolstack.set_dev_state(self.xs, self.be, dev.name, S.CLOSED)
                    continue
                self.luns[vdev.nexus] = pdev
                await toolstack.set_dev_state(self.xs, self.be, dev.name, S.INITIALISED)
            elif dev.state == S.CLOSING:
                if vdev is not None:
                    self.luns.pop(vdev.nexus, None)
                await toolstack.set_dev_state(self.xs, self.be, dev.name, S.CLOSED)

    async def _reset_devs(self) -> None:
        """Before a reconnect: every live device is offered again (3/4 -> 1), as at attach."""
        self.luns.clear()
        for dev in await toolstack.read_devs(self.xs, self.be):
            if dev.state in (S.INITIALISED, S.CONNECTED):
                await toolstack.set_dev_state(self.xs, self.be, dev.name, S.INITIALISING)

    async def _update_dev_states(self) -> None:
        """VSCSIBACK_OP_UPDATEDEV_STATE: devs 3 -> 4."""
        for dev in await toolstack.read_devs(self.xs, self.be):
            if dev.state == S.INITIALISED and dev.vdev is not None and \
                    dev.vdev.nexus in self.luns:
                await toolstack.set_dev_state(self.xs, self.be, dev.name, S.CONNECTED)

    async def _remove_closed_devs(self) -> None:
        for dev in await toolstack.read_devs(self.xs, self.be):
            if dev.state == S.CLOSED:
                await toolstack.remove_dev(self.xs, self.be, dev.name)

    async def _start_reconfiguration(self) -> None:
        pending, self._pending = self._pending, {}
        changes = [(toolstack.VDevSpec(lun), add) for lun, add in sorted(pending.items())]
        if await toolstack.reconfigure(self.xs, self.be, changes):
            log.info("%s: reconfiguring for %s", self.be, ", ".join(
                f"{'add' if add else 'remove'} LUN {lun}" for lun, add in sorted(pending.items())))
