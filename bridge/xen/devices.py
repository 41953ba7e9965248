"""vscsi-devs entries: v-dev "h:c:t:l" parsing and the v-dev <-> target LUN convention.

xen-scsifront addresses a device by (channel, id, lun) with max_target 64 and
max_lun 255 (xen-scsifront.c), and the backend looks devices up by
(channel, id, lun) only, ignoring host (xen-scsiback.c). A target LUN L is
published as v-dev "0:0:<L // 256>:<L % 256>" unless configured otherwise.
p-dev names the target LUN: "<L>" (this bridge) or "h:c:t:l" (the lun part).
Numbers are ASCII decimal only: str.isdigit() also accepts digits such as "²",
which int() refuses, and "٣", which int() reads as 3.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bridge.scsi.identity import IQN_PREFIX

SCSIFRONT_MAX_LUN = 255
SCSIFRONT_MAX_TARGET = 64
NEXUS_NAME_RE = re.compile(r"[^a-z0-9.\-]")


@dataclass(frozen=True)
class VDev:
    host: int
    channel: int
    id: int
    lun: int

    @classmethod
    def from_text(cls, text: str) -> VDev:
        """Parse "h:c:t:l"; ValueError saying what is wrong otherwise."""
        parts = text.strip().rstrip("\0").split(":")
        if len(parts) != 4:
            raise ValueError(f"v-dev {text!r} is not h:c:t:l")
        h, c, t, n = (ascii_decimal(p, f"v-dev {text!r}: field") for p in parts)
        return cls(h, c, t, n)

    @classmethod
    def parse(cls, text: str) -> VDev | None:
        """Parse "h:c:t:l"; None if it is not one (a node read from xenstore)."""
        try:
            return cls.from_text(text)
        except ValueError:
            return None

    @property
    def nexus(self) -> tuple[int, int, int]:
        return self.channel, self.id, self.lun

    def __str__(self) -> str:
        return f"{self.host}:{self.channel}:{self.id}:{self.lun}"


def vdev_for_lun(lun: int, host: int = 0) -> VDev:
    return VDev(host, 0, lun // (SCSIFRONT_MAX_LUN + 1), lun % (SCSIFRONT_MAX_LUN + 1))


def ascii_decimal(text: str, what: str = "number", limit: int = 0xFFFF) -> int:
    """A non-negative decimal of ASCII digits, at most ``limit``; ValueError otherwise."""
    if not is_ascii_decimal(text) or len(text) > len(str(limit)) or int(text) > limit:
        raise ValueError(f"{what} {text!r} is not a decimal number of ASCII digits "
                         f"from 0 to {limit}")
    return int(text)


def is_ascii_decimal(text: str) -> bool:
    """A xenstore directory name that is a domid, devid or index (ASCII digits only)."""
    return text.isascii() and text.isdigit()


def pdev_lun(text: str) -> int:
    """Target LUN named by a p-dev node ("<L>" or "h:c:t:l"); ValueError otherwise."""
    text = text.strip().rstrip("\0")
    if ":" in text:
        return VDev.from_text(text).lun
    return ascii_decimal(text, "p-dev", limit=99999)


def parse_pdev(text: str) -> int | None:
    """Target LUN named by a p-dev node, or None."""
    try:
        return pdev_lun(text)
    except ValueError:
        return None


def initiator_name(domain_name: str | None, domid: int, devid: int) -> str:
    """iSCSI-format initiator port name, stable across reboots when the domain has a name."""
    if domain_name:
        clean = NEXUS_NAME_RE.sub("-", domain_name.lower())[:200]
        return f"{IQN_PREFIX}:xen.{clean}.{devid}"
    return f"{IQN_PREFIX}:xen-dom{domid}-{devid}"
