"""The callback interface the composition root implements for the control plane.

Attachments are transports (a vfio-user socket, a Xen domain's vscsi device); this
package may not import them (tests/unit/test_layers.py), so ``serve`` hands the control
server an object with these calls. Errors: ValueError (a bad or conflicting parameter,
message ``"field: problem"``), LookupError (no such attachment).
"""

from __future__ import annotations

from typing import Any, Protocol

from bridge.scsi.logical_unit import LogicalUnitSpec


class AttachmentHost(Protocol):
    def attachments(self) -> list[dict[str, Any]]:
        """Every attachment: ``kind`` ("vfio_user" | "xen"), ``id``, ``initiator``,
        ``connected`` (bool, or None when unknown) and the fields of its configuration
        section (``socket``, ``num_queues``, ``queue_size``; ``domain``, ``devid``)."""
        ...

    async def add_attachment(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        """Create and start one attachment from the fields of its configuration section
        (without ``luns``); returns its entry as ``attachments()`` lists it."""
        ...

    async def remove_attachment(self, key: str) -> dict[str, Any]:
        """Stop and forget the attachment whose id, initiator or socket is ``key``."""
        ...

    def lu_spec(self, params: dict[str, Any]) -> LogicalUnitSpec:
        """Validate the fields of an [[lu]] section as the configuration file does
        (relative paths from the state directory); ValueError names the field."""
        ...
