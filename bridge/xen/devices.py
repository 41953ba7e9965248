"""vscsi-devs entries: v-dev "h:c:t:l" parsing and the v-dev <-> target LUN convention.

xen-scsifront addresses a device by (channel, id, lun) with max_target 64 and
max_lun 255 (xen-scsifront.c), and the backend looks devices up by
(channel, id, lun) only, ignoring host (xen-scsiback.c). A target LUN L is
published as v-dev "0:0:<L // 256>:<L % 256>" unless configured otherwise.
p-dev names the target LUN: "<L>" (this bridge) or "h:c:t:l" (the lun part).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
    def parse(cls, text: str) -> VDev | None:
        parts = text.strip().rstrip("\0").split(":")
        if len(parts) != 4 or not all(p.isdigit() and len(p) <= 5 for p in parts):
            return None
        h, c, t, n = (int(p) for p in parts)
        if max(h, c, t, n) > 0xFFFF:
            return None
        return cls(h, c, t, n)

    @property
    def nexus(self) -> tuple[int, int, int]:
        return self.channel, self.id, self.lun

    def __str__(self) -> str:
        return f"{self.host}:{self.channel}:{self.id}:{self.lun}"


def vdev_for_lun(lun: int, host: int = 0) -> VDev:
    return VDev(host, 0, lun // (SCSIFRONT_MAX_LUN + 1), lun % (SCSIFRONT_MAX_LUN + 1))


def parse_pdev(text: str) -> int | None:
    """Target LUN named by a p-dev node, or None."""
    text = text.strip().rstrip("\0")
    if text.isdigit() and len(text) <= 5:
        return int(text)
    v = VDev.parse(text)
    return v.lun if v is not None else None


def initiator_name(domain_name: str | None, domid: int, devid: int) -> str:
    """iSCSI-format initiator port name, stable across reboots when the domain has a name."""
    if domain_name:
        clean = NEXUS_NAME_RE.sub("-", domain_name.lower())[:200]
        return f"iqn.2026-11.org.vscsi-bridge:xen.{clean}.{devid}"
    return f"iqn.2026-11.org.vscsi-bridge:xen-dom{domid}-{devid}"
