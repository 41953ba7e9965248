"""The TOML configuration file: logical units and the initiators that see them.

Every problem is reported as one ConfigError naming the field (``lu[1].block_size``)
so the command line can print one line and exit 2.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.scsi.identity import parse_wwn
from bridge.scsi.logical_unit import LogicalUnitSpec
from bridge.scsi.request import MAX_LUN

IQN_PREFIX = "iqn.2026-11.org.vscsi-bridge"
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# SPC-4 7.6.4.6: iSCSI names are at most 223 bytes; iqn./eui./naa. forms (RFC 3720 3.2.6.3).
_ISCSI_NAME_RE = re.compile(r"^(iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:[!-~]+)?|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$")


class ConfigError(Exception):
    """A configuration problem: ``field`` is the dotted path, ``problem`` says what is wrong."""

    def __init__(self, field_path: str, problem: str) -> None:
        super().__init__(f"{field_path}: {problem}")
        self.field = field_path
        self.problem = problem


@dataclass
class VfioUserAttachment:
    """One virtio-scsi PCI device exported over a vfio-user socket: one I_T nexus."""

    socket: str
    initiator: str
    luns: dict[int, str]
    num_queues: int = 2
    queue_size: int = 256


@dataclass
class XenAttachment:
    """One vscsi device (vhost) of a Xen domain: one I_T nexus.

    ``luns`` maps the LUN of the guest's v-dev "0:0:0:<lun>" to an LU name.
    """

    domain: str  # domain name (stable across reboots) or numeric domid
    devid: int
    initiator: str
    luns: dict[int, str]


@dataclass
class BridgeConfig:
    lus: list[LogicalUnitSpec]
    vfio_user: list[VfioUserAttachment] = field(default_factory=list)
    xen: list[XenAttachment] = field(default_factory=list)
    state_dir: str = "/run/vscsi-bridge"
    log_level: str = "info"

    def lun_maps(self) -> dict[str, dict[int, str]]:
        """Initiator port name -> {LUN: LU name}, the form the target core takes."""
        maps: dict[str, dict[int, str]] = {}
        for att in [*self.vfio_user, *self.xen]:
            maps.setdefault(att.initiator, {}).update(att.luns)
        return maps


def parse_size(value: Any, where: str) -> int:
    """An integer byte count or a string such as "1GiB", "512M", "4096"."""
    if isinstance(value, bool):
        raise ConfigError(where, "must be a size such as 1073741824 or \"1GiB\"")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        size = int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "")[:1].upper()]
    else:
        raise ConfigError(where, f"must be a size such as 1073741824 or \"1GiB\", not {value!r}")
    if size <= 0:
        raise ConfigError(where, "must be greater than zero")
    return size


class _Table:
    """Typed access to one TOML table that remembers its dotted path for errors."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(where, "must be a table")
        self.data = data
        self.where = where
        self.used: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required or default is ...:
                raise ConfigError(self.path(key), "is required")
            return default
        value = self.data[key]
        if isinstance(value, bool) and kind is int or not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise ConfigError(self.path(key), f"must be {_ARTICLE.get(names, 'a ' + names)}, not {value!r}")
        return value

    def reject_unknown(self) -> None:
        for key in self.data:
            if key not in self.used:
                raise ConfigError(self.path(key), "unknown key")


_ARTICLE = {"int": "an integer", "str": "a string", "bool": "true or false", "dict": "a table",
            "list": "an array", "int or str": "an integer or a string"}


def _lun_map(t: _Table, lu_names: set[str]) -> dict[int, str]:
    raw = _Table(t.get("luns", dict, required=True), t.path("luns"))
    luns: dict[int, str] = {}
    for key in raw.data:
        where = raw.path(key)
        try:
            lun = int(key)
        except ValueError:
            raise ConfigError(where, "LUN must be an integer") from None
        if not 0 <= lun <= MAX_LUN:
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


def parse_config(data: dict[str, Any], base_dir: Path) -> BridgeConfig:
    """Validate a decoded TOML document; relative paths are taken from ``base_dir``."""
    top = _Table(data, "")
    bridge = _Table(top.get("bridge", dict, {}), "bridge")
    state_dir = bridge.get("state_dir", str, "/run/vscsi-bridge")
    log_level = bridge.get("log_level", str, "info")
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("bridge.log_level", "must be one of debug, info, warning, error")
    bridge.reject_unknown()

    lus: list[LogicalUnitSpec] = []
    raw_lus = top.get("lu", list, [])
    for i, raw in enumerate(raw_lus):
        t = _Table(raw, f"lu[{i}]")
        name = t.get("name", str, required=True)
        if not _NAME_RE.match(name):
            raise ConfigError(t.path("name"), "must be 1-64 characters of letters, digits and _ . : -")
        if any(lu.name == name for lu in lus):
            raise ConfigError(t.path("name"), f"duplicate logical unit name {name!r}")
        path = Path(t.get("path", str, required=True))
        if not path.is_absolute():
            path = base_dir / path
        size = parse_size(t.data["size"], t.path("size")) if "size" in t.data else None
        t.used.add("size")
        block_size = t.get("block_size", int, 512)
        if block_size not in (512, 4096):
            raise ConfigError(t.path("block_size"), "must be 512 or 4096")
        if size is not None and size % block_size:
            raise ConfigError(t.path("size"), f"must be a multiple of block_size ({block_size})")
        if size is None and not path.exists():
            raise ConfigError(t.path("size"), f"is required because {path} does not exist")
        wwn = t.get("wwn", str, None)
        if wwn is not None:
            try:
                parse_wwn(wwn)
            except ValueError:
                raise ConfigError(t.path("wwn"), "must be 'naa.' and 32 hex digits (NAA 6) or 16 (NAA 5)") from None
        serial = t.get("serial", str, None)
        if serial is not None and not re.fullmatch(r"[\x21-\x7e]{1,40}", serial):
            raise ConfigError(t.path("serial"), "must be 1-40 printable ASCII characters without spaces")
        read_only = t.get("read_only", bool, False)
        t.reject_unknown()
        lus.append(LogicalUnitSpec(name=name, path=str(path), size=size, block_size=block_size,
                                   read_only=read_only, wwn=wwn, serial=serial))
    if not lus:
        raise ConfigError("lu", "at least one [[lu]] is required")
    lu_names = {lu.name for lu in lus}

    vfio: list[VfioUserAttachment] = []
    for i, raw in enumerate(top.get("vfio_user", list, [])):
        t = _Table(raw, f"vfio_user[{i}]")
        sock = t.get("socket", str, required=True)
        if not Path(sock).is_absolute():
            sock = str(Path(state_dir) / sock)
        if any(v.socket == sock for v in vfio):
            raise ConfigError(t.path("socket"), f"socket {sock} is used twice")
        num_queues = t.get("num_queues", int, 2)
        if not 1 <= num_queues <= 64:
            raise ConfigError(t.path("num_queues"), "must be between 1 and 64")
        queue_size = t.get("queue_size", int, 256)
        if queue_size not in (16, 32, 64, 128, 256, 512, 1024):
            raise ConfigError(t.path("queue_size"), "must be a power of two between 16 and 1024")
        initiator = _initiator(t, f"{IQN_PREFIX}:vfio-user.{Path(sock).stem}")
        vfio.append(VfioUserAttachment(sock, initiator, _lun_map(t, lu_names), num_queues, queue_size))
        t.reject_unknown()

    xen: list[XenAttachment] = []
    for i, raw in enumerate(top.get("xen", list, [])):
        t = _Table(raw, f"xen[{i}]")
        domain = t.get("domain", (str, int), required=True)
        devid = t.get("devid", int, 0)
        if not 0 <= devid <= 0xFFFF:
            raise ConfigError(t.path("devid"), "must be between 0 and 65535")
        initiator = _initiator(t, f"{IQN_PREFIX}:xen.{domain}.{devid}")
        xen.append(XenAttachment(str(domain), devid, initiator, _lun_map(t, lu_names)))
        t.reject_unknown()

    initiators = [att.initiator for att in [*vfio, *xen]]
    for name in initiators:
        if initiators.count(name) > 1:
            raise ConfigError("initiator", f"{name} is used by two attachments")
    top.reject_unknown()
    return BridgeConfig(lus, vfio, xen, state_dir, log_level)


def load_config(path: str | Path) -> BridgeConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(str(path), "no such file") from None
    except OSError as e:
        raise ConfigError(str(path), e.strerror or str(e)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"not valid TOML: {e}") from None
    return parse_config(data, path.parent.resolve())


def demo_config(cache_dir: Path) -> BridgeConfig:
    """The default configuration: one sparse 1 GiB image served to one vfio-user guest."""
    return parse_config(
        {
            "bridge": {"state_dir": str(cache_dir / "run")},
            "lu": [{"name": "disk0", "path": str(cache_dir / "disk0.img"), "size": "1GiB"}],
            "vfio_user": [{"socket": "demo.sock", "luns": {"0": "disk0"}}],
        },
        cache_dir,
    )
