"""Stable logical unit identity (NAA WWN, unit serial), kept in a sidecar JSON file.

The sidecar ``<image>.vscsi-id.json`` is written with temp file + fsync + rename so
that a crash never leaves it half-written, and is not world-readable (state_file.py). Configured values win over stored ones.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any

from .state_file import write_atomically

log = logging.getLogger(__name__)

# iSCSI-format names (RFC 3720 3.2.6.3.1) of this bridge: the target port, and the
# initiator ports the configuration and the Xen backend name by default.
IQN_PREFIX = "iqn.2026-11.org.vscsi-bridge"
TARGET_PORT_NAME = f"{IQN_PREFIX}:target"

# IEEE company ID used for generated NAA-6 names. Not an assigned OUI: 0Ah has the
# "X" (locally administered) bit set and the "M" (group) bit clear, the CID form.
LOCAL_COMPANY_ID = 0x0A5C51

_WWN_RE = re.compile(r"^naa\.([0-9a-fA-F]{16}|[0-9a-fA-F]{32})$")


def parse_wwn(wwn: str) -> bytes:
    """'naa.' + 32 hex digits (NAA 6, IEEE Registered Extended, SPC-4 7.8.6.6.5) or
    16 hex digits (NAA 5 IEEE Registered, 7.8.6.6.4). A 16-digit name starting with 6
    is taken as the first half of an NAA-6 name and zero-extended to 16 bytes."""
    m = _WWN_RE.match(wwn)
    if not m:
        raise ValueError(f"wwn {wwn!r}: expected 'naa.' followed by 16 or 32 hex digits")
    raw = bytes.fromhex(m.group(1))
    naa = raw[0] >> 4
    if len(raw) == 16 and naa != 6:
        raise ValueError(f"wwn {wwn!r}: a 32-digit name must be NAA 6")
    if len(raw) == 8:
        if naa == 6:
            raw += bytes(8)
        elif naa not in (2, 3, 5):
            raise ValueError(f"wwn {wwn!r}: NAA {naa} is not a valid 8-byte NAA format")
    return raw


def format_wwn(raw: bytes) -> str:
    return "naa." + raw.hex()


def generate_wwn() -> bytes:
    """NAA 6: NAA(4 bits) | company id(24) | vendor specific id(36) | extension(64)."""
    vsid = int.from_bytes(secrets.token_bytes(5), "big") & ((1 << 36) - 1)
    hi = (6 << 60) | (LOCAL_COMPANY_ID << 36) | vsid
    return hi.to_bytes(8, "big") + secrets.token_bytes(8)


_SERIAL_RE = re.compile(r"^[\x21-\x7e]{1,64}$")


def check_serial(serial: str) -> str:
    """Unit serial: printable ASCII without spaces (SPC-4 7.8.16), at most 64 characters here."""
    if not _SERIAL_RE.match(serial):
        raise ValueError(f"serial {serial!r}: 1..64 printable ASCII characters, no spaces")
    return serial


def sidecar_path(image_path: str) -> str:
    return image_path + ".vscsi-id.json"


def load_sidecar(image_path: str) -> dict[str, Any]:
    try:
        with open(sidecar_path(image_path), encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable identity sidecar %s: %s", sidecar_path(image_path), e)
        return {}
    return data if isinstance(data, dict) else {}


def encode_sidecar(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True).encode() + b"\n"


def store_sidecar(image_path: str, data: dict[str, Any]) -> None:
    """Write it atomically, mode 0600 (state_file.write_atomically). Blocking."""
    write_atomically(sidecar_path(image_path), encode_sidecar(data))


@dataclass(frozen=True)
class Identity:
    wwn: bytes  # 8 or 16 bytes, NAA designator
    serial: str


def resolve_identity(image_path: str, wwn: str | None, serial: str | None) -> tuple[Identity, dict[str, Any]]:
    """Configured, else stored, else generated; stores the result when it changed.

    Returns the identity and the sidecar contents (other modules keep saved state there).
    """
    data = load_sidecar(image_path)
    raw: bytes | None = parse_wwn(wwn) if wwn else None
    if raw is None and isinstance(data.get("wwn"), str):
        try:
            raw = parse_wwn(data["wwn"])
        except ValueError:
            log.warning("sidecar of %s has a bad wwn; generating a new one", image_path)
    if raw is None:
        raw = generate_wwn()
    if serial is None and isinstance(data.get("serial"), str):
        try:
            serial = check_serial(data["serial"])
        except ValueError:
            serial = None
    if serial is None:
        serial = raw.hex()[-16:].upper()
    check_serial(serial)
    if data.get("wwn") != format_wwn(raw) or data.get("serial") != serial:
        data["wwn"] = format_wwn(raw)
        data["serial"] = serial
        try:
            store_sidecar(image_path, data)
        except OSError as e:  # read-only directory: identity is then not stable, say so
            log.warning("cannot store identity sidecar for %s: %s", image_path, e)
    return Identity(raw, serial), data
