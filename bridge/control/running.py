"""The running configuration as a document in the configuration file's shape, and TOML.

``document`` reads the live state (LUs of the target, attachments of the composition
root, LUN maps of the target); ``to_toml`` writes it in the format bridge/config.py
parses, so ``vscsi-bridge check-config`` accepts what ``config.save`` wrote.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from bridge.scsi.ports import initiator_name_of
from bridge.scsi.target import Target

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
VFIO_USER_KEYS = ("socket", "initiator", "num_queues", "queue_size", "doorbell")
XEN_KEYS = ("domain", "devid", "initiator")


def lu_section(target: Target, name: str) -> dict[str, Any]:
    lu = target.logical_unit(name)
    spec = lu.spec
    out: dict[str, Any] = {"name": name, "path": spec.path}
    size = lu.backing.size
    if size and size % lu.block_size == 0:
        out["size"] = size  # creates the image again if it is gone; never resizes
    out["block_size"] = lu.block_size
    out["read_only"] = lu.read_only
    if spec.wwn is not None:
        out["wwn"] = spec.wwn
    if spec.serial is not None:
        out["serial"] = spec.serial
    return out


def document(target: Target, attachments: list[dict[str, Any]], state_dir: str,
             log_level: str) -> dict[str, Any]:
    maps = target.lun_maps()
    doc: dict[str, Any] = {
        "bridge": {"state_dir": state_dir, "log_level": log_level},
        "lu": [lu_section(target, lu.name) for lu in target.logical_units()],
    }
    for kind, keys in (("vfio_user", VFIO_USER_KEYS), ("xen", XEN_KEYS)):
        sections = []
        for att in attachments:
            if att["kind"] != kind:
                continue
            section = {k: att[k] for k in keys if att.get(k) is not None}
            section["luns"] = {str(lun): name for lun, name in
                               sorted(maps.get(att["initiator"], {}).items())}
            # The target port (bridge/scsi/ports.py); the initiator name without the ISID
            # parse_config gives each of one guest's paths again, in the same order.
            port = target.ports.port_of_nexus(att["initiator"])
            if "initiator" in section:
                section["initiator"] = initiator_name_of(section["initiator"])
            section["relative_port"] = port.relative_id
            section["port_group"] = port.group.name
            sections.append(section)
        if sections:
            doc[kind] = sections
    groups = sorted(target.ports.groups.values(), key=lambda g: g.id)
    doc["port_group"] = [{"name": g.name, "id": g.id, "state": g.state.label,
                          "preferred": g.preferred} for g in groups]
    return doc


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        # A JSON string is a TOML basic string, except DEL (and lone surrogates, which a
        # str from a TOML file or the JSON parser's ensure_ascii=False never holds).
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007F")
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else _value(k)


def to_toml(doc: dict[str, Any]) -> str:
    lines = ["# written by vscsi-bridge config.save (the running configuration)", ""]
    for name, section in doc.items():
        if isinstance(section, dict):
            lines.append(f"[{name}]")
            lines.extend(f"{_key(k)} = {_value(v)}" for k, v in section.items())
            lines.append("")
        else:
            for item in section:
                lines.append(f"[[{name}]]")
                lines.extend(f"{_key(k)} = {_value(v)}" for k, v in item.items())
                lines.append("")
    return "\n".join(lines)


def write_atomically(path: str, text: str, mode: int = 0o644) -> None:
    """Temp file beside ``path``, fsync, rename, fsync of the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        data = memoryview(text.encode())
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
