"""The TOML configuration file: logical units and the initiators that see them.

Every problem is a ConfigError naming the field (``lu[1].block_size``). Parsing goes on
after an error so that ``check-config`` can list every problem at once; the errors come
back together as one ConfigErrors (a ConfigError whose ``field`` is the first one's).
Relative paths (images, ``state_dir``) are taken from the configuration file's directory.
The TOML reading machinery is bridge/config_toml.py; the checks of the files named
(images, socket paths) that need no serving are bridge/config_files.py.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.config_files import MAX_SOCKET_PATH as MAX_SOCKET_PATH
from bridge.config_files import ImageFacts as ImageFacts
from bridge.config_files import check_socket_path, image_facts
from bridge.config_toml import ConfigError as ConfigError
from bridge.config_toml import ConfigErrors as ConfigErrors
from bridge.config_toml import Errors as _Errors
from bridge.config_toml import Table as _Table
from bridge.config_toml import format_size as format_size
from bridge.config_toml import parse_size as parse_size
from bridge.config_toml import tables as _tables
from bridge.scsi.alua import AccessState, parse_state
from bridge.scsi.identity import IQN_PREFIX, parse_wwn
from bridge.scsi.logical_unit import LogicalUnitSpec, check_physical_block_size
from bridge.scsi.ports import GroupSpec, PortMap, PortSpec, initiator_port_name
from bridge.scsi.request import MAX_LUN
from bridge.unix_socket import SocketAccess

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# TOML table keys are strings: int() would also take "00", "+1" and "1_000".
_LUN_KEY_RE = re.compile(r"^(0|[1-9][0-9]*)$")
# SPC-4 7.6.4.6: iSCSI names are at most 223 bytes; iqn./eui./naa. forms (RFC 3720 3.2.6.3).
_ISCSI_NAME_RE = re.compile(r"^(iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:[!-~]+)?|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
# How the Xen backend reaches guest pages (bridge/xen/datapath.py): copy small requests and
# map large ones, gntdev map or GNTTABOP_copy. The first is the default.
GRANT_STRATEGIES = ("auto", "map", "copy")
DOORBELLS = ("trap", "poll")


@dataclass
class VfioUserAttachment:
    """One virtio-scsi PCI device exported over a vfio-user socket: one target port and
    one initiator port, so one I_T nexus.

    ``initiator`` is the initiator port name the core keys the nexus by: the configured
    iSCSI name, or ``name,i,0x<ISID>`` when that name is on several attachments (one
    guest's paths, bridge/scsi/ports.py). ``relative_port`` and ``port_group`` are the
    target port's (SPC-4 5.15), filled in by parse_config when not configured.
    """

    socket: str
    initiator: str
    luns: dict[int, str]
    num_queues: int = 2
    queue_size: int = 256
    access: SocketAccess = field(default_factory=SocketAccess)
    relative_port: int = 0
    port_group: str = ""
    # How the guest's queue notifications arrive (bridge/virtio/scsi_device.py): "trap",
    # a vfio-user REGION_WRITE message per doorbell (QEMU's client has no ioeventfds), or
    # "poll", an mmapped notify area the bridge polls (lower latency, a polling loop's CPU).
    doorbell: str = "trap"

    @property
    def label(self) -> str:
        return f"vfio-user.{Path(self.socket).stem}"


@dataclass
class XenAttachment:
    """One vscsi device (vhost) of a Xen domain: one I_T nexus.

    ``luns`` maps the LUN of the guest's v-dev "0:0:0:<lun>" to an LU name.
    """

    domain: str  # domain name (stable across reboots) or numeric domid
    devid: int
    initiator: str
    luns: dict[int, str]
    relative_port: int = 0  # as VfioUserAttachment's
    port_group: str = ""

    @property
    def label(self) -> str:
        return f"xen.{self.domain}.{self.devid}"


@dataclass(frozen=True)
class PortGroupConfig:
    """A ``[[port_group]]``: a target port group (SPC-4 5.15.2.2) and its initial state."""

    name: str
    id: int
    state: AccessState = AccessState.ACTIVE_OPTIMIZED
    preferred: bool = False


@dataclass(frozen=True)
class ImageLocking:
    """How an LU's image is locked against other writers (QEMU's own lock bytes).

    ``share_rw``: other writers that also share write access (QEMU ``share-rw=on``) may
    open it too, for cluster file systems on shared storage. ``enabled`` False takes no
    locks at all (QEMU ``file.locking=off``), for storage where another host coordinates.
    """

    enabled: bool = True
    share_rw: bool = False


@dataclass
class BridgeConfig:
    lus: list[LogicalUnitSpec]
    vfio_user: list[VfioUserAttachment] = field(default_factory=list)
    xen: list[XenAttachment] = field(default_factory=list)
    state_dir: str = "/run/vscsi-bridge"
    log_level: str = "info"
    log_format: str = "text"
    locking: dict[str, ImageLocking] = field(default_factory=dict)  # LU name -> locking
    images: dict[str, ImageFacts] = field(default_factory=dict)  # LU name -> facts
    warnings: list[str] = field(default_factory=list)  # printed by check-config, logged by serve
    source: str | None = None  # the file it came from
    xen_grant_strategy: str = GRANT_STRATEGIES[0]
    # [bridge] socket_mode/owner/group: the control socket's, and every socket's default.
    socket_access: SocketAccess = field(default_factory=SocketAccess)
    port_groups: list[PortGroupConfig] = field(default_factory=list)  # every group, by id

    def lun_maps(self) -> dict[str, dict[int, str]]:
        """Initiator port name -> {LUN: LU name}, the form the target core takes."""
        maps: dict[str, dict[int, str]] = {}
        for att in [*self.vfio_user, *self.xen]:
            maps.setdefault(att.initiator, {}).update(att.luns)
        return maps

    def port_map(self) -> PortMap:
        """The target's ports and groups (bridge/scsi/ports.py): one port per attachment."""
        groups = [GroupSpec(g.name, g.id, g.state, g.preferred) for g in self.port_groups]
        ports = [PortSpec(a.relative_port, a.port_group, a.label, a.initiator)
                 for a in [*self.vfio_user, *self.xen]]
        return PortMap(groups, ports)


def _lun_map(t: _Table, lu_names: set[str], errors: _Errors) -> dict[int, str]:
    luns: dict[int, str] = {}
    with errors.field():
        raw = _Table(t.get("luns", dict, required=True), t.path("luns"))
        for key in raw.data:
            where = raw.path(key)
            with errors.field():
                if not _LUN_KEY_RE.match(key):
                    raise ConfigError(where, "LUN must be a decimal integer without leading zeros, "
                                             "signs or underscores")
                lun = int(key)
                if lun > MAX_LUN:
                    raise ConfigError(where, f"LUN must be between 0 and {MAX_LUN}")
                name = raw.get(key, str)
                if name not in lu_names:
                    raise ConfigError(where, f"no logical unit named {name!r}")
                luns[lun] = name
    return luns


def _initiator(t: _Table, default: str) -> str:
    name = t.get("initiator", str, default)
    if len(name.encode()) > 223 or not _ISCSI_NAME_RE.match(name):
        raise ConfigError(t.path("initiator"), "must be an iSCSI name (iqn.YYYY-MM.domain[:id], eui. or naa.)")
    return name


def _unique_name(t: _Table, taken: set[str], duplicate: str) -> str:
    """The table's ``name`` (an LU's, a port group's); ``duplicate`` words the error when
    ``taken`` has it already (``{!r}``: the name)."""
    name = t.get("name", str, required=True)
    if not _NAME_RE.match(name):
        raise ConfigError(t.path("name"), "must be 1-64 characters of letters, digits and _ . : -")
    if name in taken:
        raise ConfigError(t.path("name"), duplicate.format(name))
    return name


def _resolve(path: str, base_dir: Path) -> Path:
    p = Path(path)
    return Path(os.path.normpath(p if p.is_absolute() else base_dir / p))


def _socket_access(t: _Table, inherited: SocketAccess) -> SocketAccess:
    """``socket_mode`` (e.g. "0660" or 0o660), ``socket_owner`` and ``socket_group``
    (names or numeric ids) of one table, each defaulting to ``inherited``."""
    mode, uid, gid = inherited.mode, inherited.uid, inherited.gid
    raw_mode = t.get("socket_mode", (str, int), None)
    if raw_mode is not None:
        try:
            mode = int(raw_mode, 8) if isinstance(raw_mode, str) else raw_mode
        except ValueError:
            raise ConfigError(t.path("socket_mode"), f"must be an octal mode such as \"0660\", not {raw_mode!r}") from None
        if not 0 <= mode <= 0o777:
            raise ConfigError(t.path("socket_mode"), "must be between 0000 and 0777")
    owner = t.get("socket_owner", (str, int), None)
    if owner is not None:
        try:
            uid = owner if isinstance(owner, int) else int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid
        except KeyError:
            raise ConfigError(t.path("socket_owner"), f"no user named {owner!r} on this host") from None
    group = t.get("socket_group", (str, int), None)
    if group is not None:
        try:
            gid = group if isinstance(group, int) else int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(t.path("socket_group"), f"no group named {group!r} on this host") from None
    return SocketAccess(mode, uid, gid)


def parse_config(data: dict[str, Any], base_dir: Path, *,
                 require_attachments: bool = True) -> BridgeConfig:
    """Validate a decoded TOML document; relative paths are taken from ``base_dir``.
    ``require_attachments=False`` checks sections added to a running bridge (the
    control plane's lu.add / attach.add), which serve through attachments it has.

    Raises ConfigErrors listing every problem found.
    """
    errors = _Errors()
    warnings: list[str] = []
    top = _Table(data, "")
    state_dir = "/run/vscsi-bridge"
    log_level, log_format, grant_strategy = "info", "text", GRANT_STRATEGIES[0]
    default_access = SocketAccess()
    with errors.field():
        bridge = _Table(top.get("bridge", dict, {}), "bridge")
        with errors.field():
            state_dir = str(_resolve(bridge.get("state_dir", str, "/run/vscsi-bridge"), base_dir))
        with errors.field():
            log_level = bridge.get("log_level", str, "info")
            if log_level not in LOG_LEVELS:
                raise ConfigError("bridge.log_level", "must be one of " + ", ".join(LOG_LEVELS))
        with errors.field():
            log_format = bridge.get("log_format", str, "text")
            if log_format not in LOG_FORMATS:
                raise ConfigError("bridge.log_format", "must be one of " + ", ".join(LOG_FORMATS))
        with errors.field():
            default_access = _socket_access(bridge, default_access)
        with errors.field():
            grant_strategy = bridge.get("xen_grant_strategy", str, GRANT_STRATEGIES[0])
            if grant_strategy not in GRANT_STRATEGIES:
                raise ConfigError("bridge.xen_grant_strategy", "must be one of " + ", ".join(GRANT_STRATEGIES))
        bridge.reject_unknown(errors)

    lus: list[LogicalUnitSpec] = []
    locking: dict[str, ImageLocking] = {}
    images: dict[str, ImageFacts] = {}
    seen_paths: dict[str, str] = {}  # real path -> the lu[i] that has it
    raw_lus, raw_lus_tables = _tables(top, "lu", errors)
    for t in raw_lus_tables:
        where = t.where
        name = path = None
        size: int | None = None
        block_size = 512
        with errors.field():
            name = _unique_name(t, {lu.name for lu in lus}, "duplicate logical unit name {!r}")
        with errors.field():
            path = _resolve(t.get("path", str, required=True), base_dir)
        with errors.field():
            block_size = t.get("block_size", int, 512)
            if block_size not in (512, 4096):
                raise ConfigError(t.path("block_size"), "must be 512 or 4096")
        physical_block_size = None
        with errors.field():
            # 512e: 512-byte logical blocks on 4096-byte physical ones (READ CAPACITY(16)
            # LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT, SBC-3 5.16.2).
            physical_block_size = t.get("physical_block_size", int, None)
            if physical_block_size is not None:
                try:
                    check_physical_block_size(physical_block_size, block_size)
                except ValueError as e:
                    raise ConfigError(t.path("physical_block_size"),
                                      str(e).removeprefix("physical_block_size: ")) from None
        t.used.add("size")
        size_ok = False
        with errors.field():
            size = parse_size(t.data["size"], t.path("size")) if "size" in t.data else None
            if size is not None and block_size in (512, 4096) and size % block_size:
                raise ConfigError(t.path("size"), f"must be a multiple of block_size ({block_size})")
            size_ok = True
        wwn = serial = None
        with errors.field():
            wwn = t.get("wwn", str, None)
            if wwn is not None:
                try:
                    parse_wwn(wwn)
                except ValueError:
                    raise ConfigError(t.path("wwn"), "must be 'naa.' and 32 hex digits (NAA 6) or 16 (NAA 5)") from None
        with errors.field():
            serial = t.get("serial", str, None)
            if serial is not None and not re.fullmatch(r"[\x21-\x7e]{1,40}", serial):
                raise ConfigError(t.path("serial"), "must be 1-40 printable ASCII characters without spaces")
        read_only = False
        with errors.field():
            read_only = t.get("read_only", bool, False)
        lock = ImageLocking()
        with errors.field():
            lock = ImageLocking(enabled=t.get("locking", bool, True), share_rw=t.get("share_rw", bool, False))
        t.reject_unknown(errors)
        facts = None
        if path is not None:
            with errors.field():
                facts = image_facts(where, path, size, block_size, warnings, size_reported=not size_ok)
            # Two LUs on one file would be served with two WWNs, share one .pr.json and
            # overwrite each other's data without either knowing.
            real = os.path.realpath(path)
            if real in seen_paths:
                errors.add(t.path("path"), f"{path} is also the image of {seen_paths[real]}; "
                                           "one image can back only one logical unit")
            else:
                seen_paths[real] = where
        if name is None or path is None:  # reported above
            continue
        lus.append(LogicalUnitSpec(name=name, path=str(path), size=size, block_size=block_size,
                                   physical_block_size=physical_block_size,
                                   read_only=read_only, wwn=wwn, serial=serial))
        locking[name] = lock
        if facts is not None:
            images[name] = facts
    if not raw_lus:
        errors.add("lu", "at least one [[lu]] is required")
    lu_names = {lu.name for lu in lus} | {
        r.get("name") for r in raw_lus if isinstance(r, dict) and isinstance(r.get("name"), str)}

    vfio: list[VfioUserAttachment] = []
    # initiator name -> (the attachments that have it, (transport, domain) of the first)
    owners: dict[str, tuple[list[str], tuple[str, str]]] = {}
    wheres: list[str] = []  # the table of each attachment, vfio_user then xen
    raw_vfio, raw_vfio_tables = _tables(top, "vfio_user", errors)
    for t in raw_vfio_tables:
        where = t.where
        sock = None
        with errors.field():
            sock = str(_resolve(t.get("socket", str, required=True), Path(state_dir)))
            if any(v.socket == sock for v in vfio):
                raise ConfigError(t.path("socket"), f"socket {sock} is used twice")
            check_socket_path(t.path("socket"), Path(sock), Path(state_dir))
        num_queues, queue_size = 2, 256
        with errors.field():
            num_queues = t.get("num_queues", int, 2)
            if not 1 <= num_queues <= 64:
                raise ConfigError(t.path("num_queues"), "must be between 1 and 64")
        with errors.field():
            queue_size = t.get("queue_size", int, 256)
            if queue_size not in (16, 32, 64, 128, 256, 512, 1024):
                raise ConfigError(t.path("queue_size"), "must be a power of two between 16 and 1024")
        initiator = None
        with errors.field():
            initiator = _initiator(t, f"{IQN_PREFIX}:vfio-user.{Path(sock or 'x').stem}")
        access = default_access
        with errors.field():
            access = _socket_access(t, default_access)
        doorbell = "trap"
        with errors.field():
            doorbell = t.get("doorbell", str, "trap")
            if doorbell not in DOORBELLS:
                raise ConfigError(t.path("doorbell"), "must be one of " + ", ".join(DOORBELLS))
        luns = _lun_map(t, lu_names, errors)
        rel, group = _port_fields(t, errors)
        t.reject_unknown(errors)
        if initiator is not None:
            _claim_initiator(owners, initiator, where, errors, ("vfio_user", ""))
        if sock is not None and initiator is not None:
            vfio.append(VfioUserAttachment(sock, initiator, luns, num_queues, queue_size, access,
                                           rel, group, doorbell))
            wheres.append(where)

    xen: list[XenAttachment] = []
    devices: dict[tuple[str, int], str] = {}
    raw_xen, raw_xen_tables = _tables(top, "xen", errors)
    for t in raw_xen_tables:
        where = t.where
        domain = None
        devid = 0
        with errors.field():
            domain = str(t.get("domain", (str, int), required=True))
        with errors.field():
            devid = t.get("devid", int, 0)
            if not 0 <= devid <= 0xFFFF:
                raise ConfigError(t.path("devid"), "must be between 0 and 65535")
        initiator = None
        with errors.field():
            initiator = _initiator(t, f"{IQN_PREFIX}:xen.{domain}.{devid}")
        luns = _lun_map(t, lu_names, errors)
        rel, group = _port_fields(t, errors)
        t.reject_unknown(errors)
        if domain is None:
            continue
        if (domain, devid) in devices:
            errors.add(t.path("devid"), f"domain {domain} vscsi device {devid} is also configured by "
                                        f"{devices[(domain, devid)]}")
        devices[(domain, devid)] = where
        if initiator is not None:
            _claim_initiator(owners, initiator, where, errors, ("xen", domain))
            xen.append(XenAttachment(domain, devid, initiator, luns, rel, group))
            wheres.append(where)
    if require_attachments and raw_lus and not raw_vfio and not raw_xen:
        errors.add("vfio_user", "nothing to serve: add a [[vfio_user]] or [[xen]] attachment")
    port_groups = _port_groups(top, [*vfio, *xen], wheres, errors)
    top.reject_unknown(errors)
    if errors.errors:
        raise ConfigErrors(errors.errors)
    return BridgeConfig(lus, vfio, xen, state_dir, log_level, log_format, locking, images, warnings,
                        xen_grant_strategy=grant_strategy, socket_access=default_access,
                        port_groups=port_groups)


def _claim_initiator(owners: dict[str, tuple[list[str], tuple[str, str]]], name: str, where: str,
                     errors: _Errors, guest: tuple[str, str]) -> None:
    """One initiator name on several attachments is one guest with several paths: all
    vfio-user (one KVM guest's devices) or all one Xen domain's vscsi devices."""
    if name not in owners:
        owners[name] = ([where], guest)
        return
    wheres, first = owners[name]
    if guest != first:
        errors.add(f"{where}.initiator", f"{name} is also the initiator of {wheres[0]}; one "
                                         "initiator name on several attachments must be one "
                                         "guest's paths (all vfio_user, or one Xen domain's devices)")
        return
    wheres.append(where)


def _port_fields(t: _Table, errors: _Errors) -> tuple[int, str]:
    rel, group = 0, ""
    with errors.field():
        rel = t.get("relative_port", int, 0)
        if "relative_port" in t.data and not 1 <= rel <= 0xFFFF:
            raise ConfigError(t.path("relative_port"), "must be between 1 and 65535")
    with errors.field():
        group = t.get("port_group", str, "")
        if "port_group" in t.data and not _NAME_RE.match(group):
            raise ConfigError(t.path("port_group"), "must be 1-64 characters of letters, digits and _ . : -")
    return rel, group


def _port_groups(top: _Table, atts: list[VfioUserAttachment | XenAttachment], wheres: list[str],
                 errors: _Errors) -> list[PortGroupConfig]:
    """``[[port_group]]`` tables; each attachment's relative port, group and initiator port.

    Defaults (bridge/scsi/ports.py): relative ports 1, 2, ... in file order (vfio_user,
    then xen) skipping configured ones; a group of its own per attachment, named after
    it (``vfio-user.<socket stem>``, ``xen.<domain>.<devid>``), active/optimized.
    """
    declared: list[PortGroupConfig] = []
    raw_groups, raw_groups_tables = _tables(top, "port_group", errors)
    for t in raw_groups_tables:
        where = t.where
        name, gid, state, preferred = None, 0, AccessState.ACTIVE_OPTIMIZED, False
        with errors.field():
            name = _unique_name(t, {g.name for g in declared}, "port group {!r} defined twice")
        with errors.field():
            gid = t.get("id", int, 0)
            if "id" in t.data and not 1 <= gid <= 0xFFFF:
                raise ConfigError(t.path("id"), "must be between 1 and 65535")
            if gid and any(g.id == gid for g in declared):
                raise ConfigError(t.path("id"), f"port group id {gid} is used twice")
        with errors.field():
            try:
                state = parse_state(t.get("state", str, "active/optimized"))
            except ValueError as e:
                raise ConfigError(t.path("state"), str(e)) from None
        with errors.field():
            preferred = t.get("preferred", bool, False)
        t.reject_unknown(errors)
        if name is not None:  # else reported above
            declared.append(PortGroupConfig(name, gid, state, preferred))
    # Relative target ports: configured first, then the lowest free numbers in order.
    taken: dict[int, str] = {}
    for att, where in zip(atts, wheres, strict=True):
        if att.relative_port:
            if att.relative_port in taken:
                errors.add(f"{where}.relative_port", f"relative port {att.relative_port} is also "
                                                     f"{taken[att.relative_port]}'s")
            taken[att.relative_port] = where
    free = (i for i in range(1, 0x10000) if i not in taken)
    for att in atts:
        if not att.relative_port:
            att.relative_port = next(free)
    # Groups: named ones that are not declared are created; ids fill the free numbers.
    groups = {g.name: g for g in declared}
    for att in atts:
        att.port_group = att.port_group or att.label
        if att.port_group not in groups:
            groups[att.port_group] = PortGroupConfig(att.port_group, 0)
    used = {g.id for g in groups.values() if g.id}
    ids = (i for i in range(1, 0x10000) if i not in used)
    final = [g if g.id else PortGroupConfig(g.name, next(ids), g.state, g.preferred)
             for g in groups.values()]
    # One initiator name on k > 1 attachments: k initiator ports, ISID 1..k (SPC-4 7.6.4.6).
    count: dict[str, int] = {}
    for att in atts:
        count[att.initiator] = count.get(att.initiator, 0) + 1
    seen: dict[str, int] = {}
    for att in atts:
        if count[att.initiator] > 1:
            name = att.initiator
            seen[name] = seen.get(name, 0) + 1
            att.initiator = initiator_port_name(name, seen[name])
    return sorted(final, key=lambda g: g.id)


def load_config(path: str | Path) -> BridgeConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(str(path), "no such file") from None
    except IsADirectoryError:
        raise ConfigError(str(path), "is a directory, not a configuration file") from None
    except OSError as e:
        raise ConfigError(str(path), e.strerror or str(e)) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "not valid TOML: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"not valid TOML: {e}") from None
    config = parse_config(data, path.parent.resolve())
    config.source = str(path.resolve())
    return config


def demo_config(cache_dir: Path) -> BridgeConfig:
    """The demo configuration (``serve --demo``): one sparse 1 GiB image, one vfio-user guest."""
    return parse_config(
        {
            "bridge": {"state_dir": str(cache_dir / "run")},
            "lu": [{"name": "disk0", "path": str(cache_dir / "disk0.img"), "size": "1GiB"}],
            "vfio_user": [{"socket": "demo.sock", "luns": {"0": "disk0"}}],
        },
        cache_dir,
    )
