"""The control methods: one table, name -> (handler, parameter schema, help).

The table drives parameter validation (jsonrpc.check_params) and ``rpc.list``. Every
handler takes the Control context and the validated params and returns a JSON value,
or raises RpcError naming the problem. Methods that change state run one at a time
(``Control.lock``); reads never wait for them.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from bridge.scsi.faults import FaultAction, FaultInjector, FaultRule
from bridge.scsi.request import MAX_LUN
from bridge.scsi.sense import SenseError
from bridge.scsi.target import Target

from . import running
from .host import AttachmentHost
from .jsonrpc import FAILED, INVALID_PARAMS, NOT_FOUND, REFUSED, Param, RpcError, param
from .uevents import BlockDeviceWatcher, block_traits

log = logging.getLogger(__name__)

LOG_LEVELS = ("debug", "info", "warning", "error")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# How long lu.remove --force waits for aborted commands to finish before closing the image.
DRAIN_TIMEOUT = 10.0


@dataclass
class Control:
    """What the methods act on: the target core, the composition root's attachments."""

    target: Target
    host: AttachmentHost
    state_dir: str
    log_level: str = "info"
    config_path: str | None = None  # the file serve was started with (config.save default)
    socket_path: str = ""
    started: float = field(default_factory=time.time)
    stats_since: float = field(default_factory=time.time)
    lock: trio.Lock = field(default_factory=trio.Lock)
    watcher: BlockDeviceWatcher | None = None  # block-device uevents (serve_control)
    faults: FaultInjector = field(init=False)  # fault.* methods

    def __post_init__(self) -> None:
        self.target.enable_statistics()
        self.faults = FaultInjector(self.target)


Handler = Callable[[Control, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Method:
    name: str
    handler: Handler
    params: tuple[Param, ...]
    help: str
    mutating: bool

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "help": self.help, "mutating": self.mutating,
                "params": [{"name": p.name, "type": p.type_names(), "required": p.required,
                            "help": p.help} for p in self.params]}


METHODS: dict[str, Method] = {}


def method(name: str, *params: Param, help: str, mutating: bool = False
           ) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        METHODS[name] = Method(name, fn, params, help, mutating)
        return fn
    return register


# ---------------------------------------------------------------- helpers

def parse_size(value: int | str, where: str = "size") -> int:
    if isinstance(value, int):
        size = value
    elif m := _SIZE_RE.match(value):
        size = int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "")[:1].upper()]
    else:
        raise RpcError(INVALID_PARAMS, f'{where}: must be a size such as 1073741824 or "1GiB", not {value!r}')
    if size <= 0:
        raise RpcError(INVALID_PARAMS, f"{where}: must be greater than zero")
    return size


def _lu(ctl: Control, name: str):
    try:
        return ctl.target.logical_unit(name)
    except KeyError:
        raise RpcError(NOT_FOUND, f"no logical unit named {name!r}") from None


def _attachment(ctl: Control, key: str) -> dict[str, Any]:
    """An attachment by id, initiator name or socket path."""
    keys = {key, os.path.join(ctl.state_dir, key)}  # a socket relative to the state directory
    for att in ctl.host.attachments():
        if keys & {att.get("id"), att.get("initiator"), att.get("socket")}:
            return att
    raise RpcError(NOT_FOUND, f"no attachment {key!r} (give its id, initiator name or socket)")


def _lun(value: int) -> int:
    if not 0 <= value <= MAX_LUN:
        raise RpcError(INVALID_PARAMS, f"lun: must be between 0 and {MAX_LUN}")
    return value


def _mapped_where(ctl: Control, name: str) -> list[dict[str, Any]]:
    by_ini = {a["initiator"]: a.get("id") for a in ctl.host.attachments()}
    return [{"initiator": ini, "lun": lun, "attachment": by_ini.get(ini)}
            for ini, lun in ctl.target.nexuses_of(name)]


def _lu_info(ctl: Control, name: str) -> dict[str, Any]:
    lu = ctl.target.logical_unit(name)
    return {"name": name, "path": lu.spec.path, "size": lu.backing.size,
            "block_size": lu.block_size, "num_blocks": lu.num_blocks,
            "wwn": "naa." + lu.identity.wwn.hex(), "serial": lu.identity.serial,
            "read_only": lu.read_only, "block_device": block_traits(lu.spec.path)
            if lu.backing.is_block_device else None,
            "mapped": _mapped_where(ctl, name)}


def _same_file(ctl: Control, path: str) -> str | None:
    """The LU already served from ``path`` (same device and inode), if any."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    for lu in ctl.target.logical_units():
        try:
            other = os.fstat(lu.backing.fd)
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino) or \
                (st.st_rdev and other.st_rdev == st.st_rdev):
            return lu.name
    return None


def _with_luns(ctl: Control, att: dict[str, Any]) -> dict[str, Any]:
    maps = ctl.target.lun_maps().get(att["initiator"], {})
    return {**att, "luns": {str(k): v for k, v in sorted(maps.items())}}


def _sense_refusal(e: SenseError) -> RpcError:
    return RpcError(FAILED, f"the reservation state could not be written ({e.sense})")


# ---------------------------------------------------------------- rpc, bridge

@method("rpc.list", help="every method with its parameters")
async def rpc_list(ctl: Control, p: dict[str, Any]) -> Any:
    return [m.describe() for m in METHODS.values()]


@method("bridge.version", help="version of the bridge, Python and trio; process id, uptime")
async def bridge_version(ctl: Control, p: dict[str, Any]) -> Any:
    from importlib import metadata

    try:
        version = metadata.version("vscsi-bridge")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"version": version, "python": platform.python_version(), "trio": trio.__version__,
            "pid": os.getpid(), "uptime_s": round(time.time() - ctl.started, 3)}


@method("bridge.config", help="the running configuration, in the configuration file's shape")
async def bridge_config(ctl: Control, p: dict[str, Any]) -> Any:
    return running.document(ctl.target, ctl.host.attachments(), ctl.state_dir, ctl.log_level)


@method("config.save",
        param("path", str, required=False,
              help="where to write (default: the file serve was started with, else "
                   "<state_dir>/bridge.toml); relative to the state directory"),
        help="write the running configuration as TOML, atomically (check-config accepts it)")
async def config_save(ctl: Control, p: dict[str, Any]) -> Any:
    path = p.get("path") or ctl.config_path or os.path.join(ctl.state_dir, "bridge.toml")
    path = os.path.join(ctl.state_dir, path)  # an absolute path stays as it is
    text = running.to_toml(running.document(ctl.target, ctl.host.attachments(),
                                            ctl.state_dir, ctl.log_level))
    try:
        await trio.to_thread.run_sync(running.write_atomically, path, text)
    except OSError as e:
        raise RpcError(FAILED, f"{path}: {e.strerror or e}") from None
    return {"path": path}


@method("log.level", param("level", str, required=False, help="debug | info | warning | error"),
        help="read or set the log level")
async def log_level(ctl: Control, p: dict[str, Any]) -> Any:
    level = p.get("level")
    if level is not None:
        if level not in LOG_LEVELS:
            raise RpcError(INVALID_PARAMS, f"level: must be one of {', '.join(LOG_LEVELS)}")
        logging.getLogger().setLevel(getattr(logging, level.upper()))
        ctl.log_level = level
        log.info("log level set to %s", level)
    return {"level": ctl.log_level}


# ---------------------------------------------------------------- logical units

@method("lu.list", help="logical units: path, size, block size, WWN, read-only, where mapped")
async def lu_list(ctl: Control, p: dict[str, Any]) -> Any:
    return [_lu_info(ctl, lu.name) for lu in ctl.target.logical_units()]


@method("lu.add",
        param("name", str), param("path", str, help="image file or block device"),
        param("size", int, str, required=False,
              help='creates a sparse image when path does not exist ("1GiB" or bytes)'),
        param("block_size", int, required=False, help="512 (default) or 4096"),
        param("read_only", bool, required=False),
        param("wwn", str, required=False), param("serial", str, required=False),
        help="add a logical unit (an existing image or block device, or a new sparse image)",
        mutating=True)
async def lu_add(ctl: Control, p: dict[str, Any]) -> Any:
    if any(lu.name == p["name"] for lu in ctl.target.logical_units()):
        raise RpcError(REFUSED, f"name: a logical unit named {p['name']!r} exists")
    try:
        spec = ctl.host.lu_spec(p)
    except ValueError as e:
        raise RpcError(INVALID_PARAMS, str(e)) from None
    traits = block_traits(spec.path)
    if traits and traits.get("logical_block_size", 0) > spec.block_size:
        raise RpcError(REFUSED, f"block_size: {spec.block_size} is smaller than the logical block "
                                f"size of {spec.path} ({traits['logical_block_size']})")
    other = _same_file(ctl, spec.path)
    if other is not None:
        raise RpcError(REFUSED, f"path: {spec.path} is the image of logical unit {other!r}")
    try:
        ctl.target.add_logical_unit(spec)
    except ValueError as e:
        raise RpcError(INVALID_PARAMS, str(e)) from None
    except OSError as e:
        raise RpcError(FAILED, f"path: {spec.path}: {e.strerror or e}") from None
    except Exception as e:  # ReservationStateError: a damaged APTPL file
        raise RpcError(FAILED, str(e)) from None
    log.info("control: LU %s added (%s)", spec.name, spec.path)
    return _lu_info(ctl, spec.name)


@method("lu.remove", param("name", str),
        param("force", bool, required=False, help="unmap it everywhere first"),
        help="remove a logical unit (refused while mapped unless force); the image stays",
        mutating=True)
async def lu_remove(ctl: Control, p: dict[str, Any]) -> Any:
    name = p["name"]
    lu = _lu(ctl, name)
    where = ctl.target.nexuses_of(name)
    if where and not p.get("force"):
        first = ", ".join(f"{ini} LUN {lun}" for ini, lun in where)
        raise RpcError(REFUSED, f"logical unit {name!r} is mapped ({first}); unmap it or use force")
    for ini, lun in where:
        ctl.target.unmap_lun(ini, lun)
    with trio.move_on_after(DRAIN_TIMEOUT):
        while len(lu.tasks):
            await trio.sleep(0.01)
    try:
        ctl.target.remove_logical_unit(name)
    except ValueError as e:
        raise RpcError(REFUSED, str(e)) from None
    ctl.faults.forget_lu(name)
    log.info("control: LU %s removed", name)
    return {"name": name, "unmapped": [{"initiator": i, "lun": n} for i, n in where]}


@method("lu.resize", param("name", str),
        param("size", int, str, required=False,
              help="new size; omitted: re-read the size of a block device"),
        param("force", bool, required=False, help="allow shrinking"),
        help="grow (or with force shrink) a logical unit; guests get CAPACITY DATA HAS CHANGED",
        mutating=True)
async def lu_resize(ctl: Control, p: dict[str, Any]) -> Any:
    name = p["name"]
    lu = _lu(ctl, name)
    old = lu.backing.size
    if "size" in p:
        new = parse_size(p["size"])
        if lu.read_only and not lu.backing.is_block_device:
            raise RpcError(REFUSED, f"logical unit {name!r} is read-only")
        if lu.backing.is_block_device and new != old:
            lu.backing.refresh_size()
            if lu.backing.size != new:
                raise RpcError(REFUSED, f"size: {name!r} is a block device of {lu.backing.size} "
                                        "bytes; resize the device, then call lu.resize without size")
    else:
        lu.backing.refresh_size()
        new = lu.backing.size
    if new % lu.block_size:
        raise RpcError(INVALID_PARAMS, f"size: must be a multiple of the block size ({lu.block_size})")
    if new < old and not p.get("force"):
        raise RpcError(REFUSED, f"size: {new} is smaller than {old}: shrinking loses data, use force")
    try:
        ctl.target.resize(name, new)
    except OSError as e:
        raise RpcError(FAILED, f"{lu.spec.path}: {e.strerror or e}") from None
    log.info("control: LU %s resized from %d to %d bytes", name, old, new)
    return {"name": name, "old_size": old, "size": lu.backing.size, "num_blocks": lu.num_blocks}


# ---------------------------------------------------------------- LUN maps

@method("lun.map", param("initiator", str, help="attachment id, initiator name or socket"),
        param("lun", int), param("lu", str, help="logical unit name"),
        help="map an LU at a LUN for one attachment's initiator (the guest sees a new disk)",
        mutating=True)
async def lun_map(ctl: Control, p: dict[str, Any]) -> Any:
    att = _attachment(ctl, p["initiator"])
    lun = _lun(p["lun"])
    _lu(ctl, p["lu"])
    ini = att["initiator"]
    current = ctl.target.lun_maps().get(ini, {}).get(lun)
    if current is not None:
        raise RpcError(REFUSED, f"{ini} LUN {lun} is mapped to {current!r}; unmap it first")
    ctl.target.map_lun(ini, lun, p["lu"])
    log.info("control: %s LUN %d -> %s", ini, lun, p["lu"])
    return {"initiator": ini, "lun": lun, "lu": p["lu"]}


@method("lun.unmap", param("initiator", str, help="attachment id, initiator name or socket"),
        param("lun", int),
        help="unmap a LUN (its commands are aborted; the guest's disk goes away)", mutating=True)
async def lun_unmap(ctl: Control, p: dict[str, Any]) -> Any:
    att = _attachment(ctl, p["initiator"])
    lun = _lun(p["lun"])
    ini = att["initiator"]
    name = ctl.target.lun_maps().get(ini, {}).get(lun)
    if name is None:
        raise RpcError(NOT_FOUND, f"{ini} has no LUN {lun}")
    ctl.target.unmap_lun(ini, lun)
    log.info("control: %s LUN %d unmapped (was %s)", ini, lun, name)
    return {"initiator": ini, "lun": lun, "lu": name}


# ---------------------------------------------------------------- attachments

@method("attach.list", help="attachments (vfio-user sockets, Xen vscsi devices) and their LUNs")
async def attach_list(ctl: Control, p: dict[str, Any]) -> Any:
    return [_with_luns(ctl, a) for a in ctl.host.attachments()]


@method("attach.add", param("kind", str, help='"vfio_user"'),
        param("socket", str, required=False, help="vfio-user socket (relative: state directory)"),
        param("initiator", str, required=False, help="iSCSI name; default derived"),
        param("num_queues", int, required=False), param("queue_size", int, required=False),
        param("domain", str, int, required=False), param("devid", int, required=False),
        param("luns", dict, required=False, help='{"<LUN>": "<LU name>"}'),
        help="add an attachment (a vfio-user socket QEMU can connect to) with its LUNs",
        mutating=True)
async def attach_add(ctl: Control, p: dict[str, Any]) -> Any:
    luns: dict[int, str] = {}
    for key, name in (p.get("luns") or {}).items():
        try:
            lun = _lun(int(key))
        except ValueError:
            raise RpcError(INVALID_PARAMS, f"luns.{key}: LUN must be an integer") from None
        if not isinstance(name, str):
            raise RpcError(INVALID_PARAMS, f"luns.{key}: must be a string (an LU name)")
        _lu(ctl, name)
        luns[lun] = name
    section = {k: v for k, v in p.items() if k not in ("kind", "luns")}
    try:
        att = await ctl.host.add_attachment(p["kind"], section)
    except ValueError as e:
        raise RpcError(INVALID_PARAMS, str(e)) from None
    except OSError as e:
        raise RpcError(FAILED, f"{e.strerror or e}") from None
    for lun, name in luns.items():
        ctl.target.map_lun(att["initiator"], lun, name)
    log.info("control: attachment %s added", att.get("id"))
    return _with_luns(ctl, att)


@method("attach.remove", param("id", str, help="attachment id, initiator name or socket"),
        param("force", bool, required=False, help="also when a client is connected"),
        help="stop an attachment (its LUN maps go with it)", mutating=True)
async def attach_remove(ctl: Control, p: dict[str, Any]) -> Any:
    att = _attachment(ctl, p["id"])
    if att.get("connected") and not p.get("force"):
        raise RpcError(REFUSED, f"attachment {att['id']!r} has a connected client; use force")
    try:
        await ctl.host.remove_attachment(att["id"])
    except ValueError as e:
        raise RpcError(REFUSED, str(e)) from None
    except LookupError as e:
        raise RpcError(NOT_FOUND, str(e)) from None
    ini = att["initiator"]
    if not any(a["initiator"] == ini for a in ctl.host.attachments()):
        for lun in ctl.target.luns_for(ini):
            ctl.target.unmap_lun(ini, lun)
    log.info("control: attachment %s removed", att["id"])
    return {"id": att["id"], "initiator": ini}


# ---------------------------------------------------------------- status, stats

def _ua_text(asc_ascq: tuple[int, int]) -> str:
    return f"{asc_ascq[0]:02X}h/{asc_ascq[1]:02X}h"


@method("status", help="attachments (connected or not), LUN maps, initiators, "
                       "reservations in memory, pending unit attentions")
async def status(ctl: Control, p: dict[str, Any]) -> Any:
    target = ctl.target
    atts = [_with_luns(ctl, a) for a in ctl.host.attachments()]
    maps = target.lun_maps()
    initiators = sorted(set(maps) | {a["initiator"] for a in atts})
    return {
        "pid": os.getpid(),
        "uptime_s": round(time.time() - ctl.started, 3),
        "control_socket": ctl.socket_path,
        "attachments": atts,
        "lun_maps": {ini: {str(k): v for k, v in sorted(m.items())} for ini, m in maps.items()},
        "initiators": initiators,
        "logical_units": [{"name": lu.name, "size": lu.backing.size,
                           "tasks_in_flight": len(lu.tasks)} for lu in target.logical_units()],
        "reservations": {lu.name: lu.reservations.status() for lu in target.logical_units()},
        "unit_attentions": [{"initiator": ini, "lu": lu, "pending": [_ua_text(u) for u in q]}
                            for ini, lu, q in target.unit_attentions.snapshot()],
        "faults": [r.as_dict() for r in ctl.faults.rules()],
        "block_devices": None if ctl.watcher is None else {
            "uevents": ctl.watcher.running, "resized": ctl.watcher.resized,
            "removed": dict(ctl.watcher.removed)},
    }


@method("stats", help="commands by kind, bytes, errors by sense key and a log2 latency "
                      "histogram (us) per LU and per initiator, since start or stats.reset")
async def stats(ctl: Control, p: dict[str, Any]) -> Any:
    s = ctl.target.enable_statistics()
    return {"since": ctl.stats_since, **s.snapshot()}


@method("stats.reset", help="set every counter to zero", mutating=True)
async def stats_reset(ctl: Control, p: dict[str, Any]) -> Any:
    ctl.target.enable_statistics().reset()
    ctl.stats_since = time.time()
    return {"since": ctl.stats_since}


# ---------------------------------------------------------------- reservations

@method("pr.show", param("lu", str, required=False, help="one LU (default: all)"),
        help="persistent reservations in memory: keys, holder, type, generation, APTPL")
async def pr_show(ctl: Control, p: dict[str, Any]) -> Any:
    lus = [_lu(ctl, p["lu"])] if "lu" in p else ctl.target.logical_units()
    return {lu.name: lu.reservations.status() for lu in lus}


@method("pr.clear", param("lu", str),
        help="drop every registration and the reservation (as targetcli's pr clear); "
             "registrants get RESERVATIONS PREEMPTED", mutating=True)
async def pr_clear(ctl: Control, p: dict[str, Any]) -> Any:
    lu = _lu(ctl, p["lu"])
    try:
        await lu.reservations.clear_all()
    except SenseError as e:
        raise _sense_refusal(e) from None
    log.warning("control: persistent reservations of %s cleared", lu.name)
    return lu.reservations.status()


# ---------------------------------------------------------------- fault injection

_FAULT_ACTIONS = ", ".join(a.value for a in FaultAction)


def _fault_initiator(ctl: Control, key: str) -> str:
    """An attachment (id, initiator name or socket) -> its initiator name; any other string
    is taken as an initiator port name (a guest that connects later)."""
    try:
        return _attachment(ctl, key)["initiator"]
    except RpcError:
        return key


@method("fault.add", param("lu", str, help="logical unit name"),
        param("action", str, help=_FAULT_ACTIONS),
        param("initiator", str, required=False,
              help="only this initiator (attachment id, initiator name or socket)"),
        param("op", str, required=False, help="only read | write | other commands"),
        param("lba_first", int, required=False, help="with lba_last: an inclusive LBA range"),
        param("lba_last", int, required=False),
        param("sense_key", int, required=False,
              help="check_condition (required), or to override a preset's"),
        param("asc", int, required=False), param("ascq", int, required=False),
        param("delay_ms", int, required=False, help="delay: milliseconds before the command runs"),
        param("count", int, required=False, help="only the next N matching commands"),
        param("every", int, required=False, help="only every Nth matching command"),
        param("abort_fails", bool, required=False,
              help="hang: ABORT TASK is answered FUNCTION REJECTED (the initiator escalates)"),
        help="add a fault rule: matching commands of the LU get an error, a delay or hang",
        mutating=True)
async def fault_add(ctl: Control, p: dict[str, Any]) -> Any:
    try:
        action = FaultAction(p["action"])
    except ValueError:
        raise RpcError(INVALID_PARAMS, f"action: must be one of {_FAULT_ACTIONS}") from None
    fields = {k: v for k, v in p.items() if k not in ("lu", "action", "initiator")}
    if "initiator" in p:
        fields["initiator"] = _fault_initiator(ctl, p["initiator"])
    rule = FaultRule(lu=p["lu"], action=action, **fields)
    try:
        rule.validate()
    except ValueError as e:
        raise RpcError(INVALID_PARAMS, str(e)) from None
    _lu(ctl, rule.lu)
    return ctl.faults.add(rule).as_dict()


@method("fault.remove", param("id", int, help="the rule's id (fault.list)"),
        help="remove one fault rule; commands it holds hung go on and run", mutating=True)
async def fault_remove(ctl: Control, p: dict[str, Any]) -> Any:
    try:
        return ctl.faults.remove(p["id"]).as_dict()
    except KeyError:
        raise RpcError(NOT_FOUND, f"no fault rule {p['id']}") from None


@method("fault.list", help="fault rules in force, with their matched and hit counters")
async def fault_list(ctl: Control, p: dict[str, Any]) -> Any:
    return [r.as_dict() for r in ctl.faults.rules()]


@method("fault.clear", help="remove every fault rule (hung commands go on and run)",
        mutating=True)
async def fault_clear(ctl: Control, p: dict[str, Any]) -> Any:
    return {"removed": [r.as_dict() for r in ctl.faults.clear()]}


async def call(ctl: Control, name: str, params: dict[str, Any]) -> Any:
    """Run one method by name with checked params (the server's and in-process tests' way)."""
    from .jsonrpc import METHOD_NOT_FOUND, check_params

    m = METHODS.get(name)
    if m is None:
        raise RpcError(METHOD_NOT_FOUND, f"no method {name!r} (rpc.list lists them)")
    check_params(params, m.params)
    if not m.mutating:
        return await m.handler(ctl, params)
    async with ctl.lock:
        return await m.handler(ctl, params)



# ALUA and path events register their rows in METHODS from their own module.
from . import alua_methods  # noqa: E402,F401
