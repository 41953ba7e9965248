"""Target ports, target port groups and the I_T nexuses through them (SAM-5 4.6, SPC-4 5.15).

Every attachment (a vfio-user socket, a Xen domain's vscsi device) is one target port
with a RELATIVE TARGET PORT IDENTIFIER (SPC-4 7.8.6.5, 1-based) in one target port
group (SPC-4 5.15.2.2) that has an asymmetric access state (alua.py). Each attachment is
also one initiator port, so an I_T nexus is named by its initiator port name alone:
``name`` when the initiator name has one attachment, ``name,i,0x<ISID>`` (the iSCSI
initiator port name of SPC-4 7.6.4.6) when it has several (one guest, several paths).
The core's per-nexus state (LUN maps, unit attentions, reservations, task sets) is keyed
by that initiator port name.

A port can be taken down (port_down): the model of a failed link. Every nexus through it
is lost (SAM-5 6.3.4: tasks aborted, SPC-2 reservations released, I_T NEXUS LOSS
OCCURRED established for when it comes back), and until it is up again every command
and task management function on it ends with ServiceResponse.PORT_DOWN, which each
transport reports as its link-loss code (virtio TRANSPORT_FAILURE, vscsiif
DID_NO_CONNECT).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .alua import ASYMMETRIC_ACCESS_STATE_CHANGED, AccessState
from .identity import TARGET_PORT_NAME
from .request import ScsiRequest

if TYPE_CHECKING:
    from .target import Target

log = logging.getLogger(__name__)

ISID_SEPARATOR = ",i,0x"

# SPC-4 6.37 REPORT TARGET PORT GROUPS status codes.
STATUS_NONE, STATUS_EXPLICIT, STATUS_IMPLICIT = 0x00, 0x01, 0x02
# SPC-4 6.37: IMPLICIT TRANSITION TIME (seconds) reported in the extended header.
DEFAULT_IMPLICIT_TRANSITION_TIME = 10


def initiator_name_of(port_name: str) -> str:
    """The iSCSI initiator name of an initiator port name (the part before ',i,0x')."""
    i = port_name.lower().find(ISID_SEPARATOR)
    return port_name if i < 0 else port_name[:i]


def initiator_port_name(name: str, isid: int | None) -> str:
    """SPC-4 7.6.4.6: ``name,i,0x`` + 12 hex digits of ISID; the bare name without one."""
    return name if isid is None else f"{name}{ISID_SEPARATOR}{isid:012x}"


def target_port_name(relative_id: int, base: str = TARGET_PORT_NAME) -> str:
    """The SCSI name of a target port (iSCSI form, SPC-4 7.6.4.6: name,t,0x<tag>)."""
    return f"{base},t,0x{relative_id:04x}"


@dataclass(eq=False)
class PortGroup:
    """A target port group (SPC-4 5.15.2.2): one access state for all its ports."""

    name: str
    id: int
    state: AccessState = AccessState.ACTIVE_OPTIMIZED
    preferred: bool = False
    status: int = STATUS_NONE
    ports: list[Port] = field(default_factory=list)


@dataclass(eq=False)
class Port:
    """A target port: ``label`` names its attachment for operators (socket, Xen device)."""

    relative_id: int
    group: PortGroup
    label: str = ""
    name: str = ""
    up: bool = True
    nexuses: list[str] = field(default_factory=list)  # initiator port names through it


@dataclass(frozen=True)
class PortSpec:
    """What the composition root declares for one attachment."""

    relative_id: int
    group: str
    label: str
    initiator_port: str


@dataclass(frozen=True)
class GroupSpec:
    name: str
    id: int
    state: AccessState = AccessState.ACTIVE_OPTIMIZED
    preferred: bool = False


class PortMap:
    """The target's ports and groups, and the I_T nexuses through each port."""

    def __init__(self, groups: list[GroupSpec], ports: list[PortSpec],
                 implicit_transition_time: int = DEFAULT_IMPLICIT_TRANSITION_TIME,
                 base_name: str = TARGET_PORT_NAME) -> None:
        self.implicit_transition_time = implicit_transition_time
        self.groups: dict[str, PortGroup] = {}
        self.ports: dict[int, Port] = {}
        self._by_nexus: dict[str, Port] = {}
        for g in groups:
            if g.name in self.groups:
                raise ValueError(f"port group {g.name!r} defined twice")
            if any(x.id == g.id for x in self.groups.values()):
                raise ValueError(f"port group id {g.id} used twice")
            if not 1 <= g.id <= 0xFFFF:
                raise ValueError(f"port group {g.name!r}: id {g.id} is not in 1..65535")
            self.groups[g.name] = PortGroup(g.name, g.id, g.state, g.preferred)
        for p in ports:
            if not 1 <= p.relative_id <= 0xFFFF:
                raise ValueError(f"{p.label}: relative target port {p.relative_id} not in 1..65535")
            group = self.groups.get(p.group)
            if group is None:
                raise ValueError(f"{p.label}: no port group named {p.group!r}")
            port = self.ports.get(p.relative_id)
            if port is None:
                port = Port(p.relative_id, group, p.label, target_port_name(p.relative_id, base_name))
                self.ports[p.relative_id] = port
                group.ports.append(port)
            elif port.group is not group:
                raise ValueError(f"{p.label}: relative target port {p.relative_id} is in two groups")
            if p.initiator_port in self._by_nexus:
                raise ValueError(f"{p.label}: initiator port {p.initiator_port} on two target ports")
            port.nexuses.append(p.initiator_port)
            self._by_nexus[p.initiator_port] = port
        if not self.ports:
            g = self.groups.setdefault("default", PortGroup("default", 1))
            port = Port(1, g, "default", target_port_name(1, base_name))
            g.ports.append(port)
            self.ports[1] = port
        self.default = self.ports[min(self.ports)]

    @classmethod
    def single(cls, base_name: str = TARGET_PORT_NAME) -> PortMap:
        """One port (relative id 1) in one active/optimized group: every nexus goes through it."""
        return cls([GroupSpec("default", 1)], [], base_name=base_name)

    # -- lookups (the hot path calls port_for once per command) ------------------

    def port_for(self, req: ScsiRequest) -> Port:
        """The target port a request came in on: its configured I_T nexus's (an initiator
        port is on one attachment only), else the relative id the transport put on the
        request, else the first port."""
        port = self._by_nexus.get(req.initiator.name)
        if port is not None:
            return port
        tp = req.target_port
        if tp is not None:
            return self.ports.get(tp.relative_id, self.default)
        return self.default

    def port_of_nexus(self, initiator_port: str) -> Port:
        return self._by_nexus.get(initiator_port, self.default)

    def group(self, key: str | int) -> PortGroup:
        """A group by name or by id (an int or a decimal string)."""
        g = self.groups.get(str(key))
        if g is not None:
            return g
        try:
            gid = int(key)
        except ValueError:
            raise KeyError(f"no port group {key!r}") from None
        for g in self.groups.values():
            if g.id == gid:
                return g
        raise KeyError(f"no port group {key!r}")

    def group_by_id(self, gid: int) -> PortGroup | None:
        for g in self.groups.values():
            if g.id == gid:
                return g
        return None

    def port(self, key: str | int) -> Port:
        """A port by relative id, or by its attachment label."""
        for p in self.ports.values():
            if p.label == str(key):
                return p
        try:
            rid = int(key)
        except ValueError:
            raise KeyError(f"no target port {key!r}") from None
        if rid not in self.ports:
            raise KeyError(f"no target port {key!r}")
        return self.ports[rid]

    def siblings(self, initiator_port: str) -> list[str]:
        """Every initiator port with the same initiator name (one guest's paths), itself first."""
        name = initiator_name_of(initiator_port)
        rest = [n for n in self._by_nexus if n != initiator_port and initiator_name_of(n) == name]
        return [initiator_port, *rest]

    def resolve(self, transport_name: str, relative_id: int) -> str | None:
        """The initiator port of the I_T nexus (TransportID, relative target port), or None.

        A TransportID with an ISID names the initiator port itself; one without names the
        initiator, whose port through that target port is meant (SPC-4 6.16.4)."""
        port = self.ports.get(relative_id)
        if port is None:
            return None
        if not self._by_nexus:  # nothing configured: the single-port model
            return transport_name
        for n in port.nexuses:
            if n == transport_name or (ISID_SEPARATOR not in transport_name.lower()
                                       and initiator_name_of(n) == transport_name):
                return n
        return None

    def add_attachment(self, label: str, initiator_port: str, relative_id: int | None = None,
                       group: str | None = None) -> Port:
        """A port for an attachment added at run time: the next free relative id and a
        group of its own (named ``label``) unless told otherwise."""
        if initiator_port in self._by_nexus:
            return self._by_nexus[initiator_port]
        if relative_id is None:
            configured = {p.relative_id for p in self.ports.values() if p.nexuses}
            relative_id = next(i for i in range(1, 0x10000) if i not in configured)
        port = self.ports.get(relative_id)
        if port is not None and not port.nexuses and port is self.default and len(self.ports) == 1:
            # The single-port default of a target started without attachments: take it over.
            del self.ports[relative_id]
            port.group.ports.remove(port)
            if not port.group.ports:
                del self.groups[port.group.name]
            port = None
        if port is None:
            name = group or label
            g = self.groups.get(name)
            if g is None:
                used = {x.id for x in self.groups.values()}
                g = PortGroup(name, next(i for i in range(1, 0x10000) if i not in used))
                self.groups[name] = g
            base = self.default.name.rsplit(",t,0x", 1)[0]
            port = Port(relative_id, g, label, target_port_name(relative_id, base))
            g.ports.append(port)
            self.ports[relative_id] = port
            self.default = self.ports[min(self.ports)]
        port.nexuses.append(initiator_port)
        self._by_nexus[initiator_port] = port
        return port

    def relative_id_of(self, initiator_port: str) -> int:
        return self.port_of_nexus(initiator_port).relative_id

    def has_port(self, relative_id: int) -> bool:
        return relative_id in self.ports

    # -- snapshot for the control plane ------------------------------------------

    def describe(self) -> dict:
        return {
            "implicit_transition_time": self.implicit_transition_time,
            "groups": [
                {"name": g.name, "id": g.id, "state": g.state.label, "preferred": g.preferred,
                 "status": g.status,
                 "ports": [{"relative_id": p.relative_id, "name": p.name, "attachment": p.label,
                            "up": p.up, "nexuses": list(p.nexuses)} for p in g.ports]}
                for g in self.groups.values()
            ],
        }


def change_states(target: Target, changes: dict[PortGroup, AccessState],
                  origin: str | None = None) -> None:
    """Apply access state changes and establish ASYMMETRIC ACCESS STATE CHANGED.

    SPC-4 5.15.2.? (implicit: ``origin`` None): the UA goes to every I_T nexus; after SET
    TARGET PORT GROUPS from the nexus ``origin``: to every other I_T nexus. Only LUs are
    told that a nexus sees; nothing happens when no state actually changes.
    """
    changed = False
    for group, state in changes.items():
        group.status = STATUS_IMPLICIT if origin is None else STATUS_EXPLICIT
        if group.state != state:
            log.info("port group %s (%d): %s -> %s%s", group.name, group.id, group.state.label,
                     state.label, "" if origin is None else f" (SET TARGET PORT GROUPS from {origin})")
            group.state = state
            changed = True
    if not changed:
        return
    for initiator, mapping in target.lun_maps().items():
        if initiator == origin:
            continue
        for lu_name in set(mapping.values()):
            target.unit_attentions.establish(initiator, lu_name, ASYMMETRIC_ACCESS_STATE_CHANGED)


def port_down(target: Target, port: Port) -> None:
    """The link of ``port`` failed: its nexuses are lost (module docstring)."""
    if not port.up:
        return
    port.up = False
    log.warning("target port %d (%s) down", port.relative_id, port.label)
    for initiator in port.nexuses:
        target.nexus_loss(initiator)


def port_up(port: Port) -> None:
    if port.up:
        return
    port.up = True
    log.warning("target port %d (%s) up", port.relative_id, port.label)
