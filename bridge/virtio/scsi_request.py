"""The virtio-scsi request and response: the one currency between transports and the core.

Layouts and codes follow virtio 1.2 section 5.6 (SCSI host device). The Xen
transport translates vscsiif requests into these types; the virtio transport
parses descriptor chains into them. The core consumes only these.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

# virtio 1.2 5.6.6.1: cdb_size and sense_size defaults after reset.
VIRTIO_SCSI_CDB_DEFAULT_SIZE = 32
VIRTIO_SCSI_SENSE_DEFAULT_SIZE = 96


class VirtioScsiResponse(enum.IntEnum):
    """virtio 1.2 5.6.6.1 'response' values of a command (and TMF) response."""

    OK = 0
    OVERRUN = 1
    ABORTED = 2
    BAD_TARGET = 3
    RESET = 4
    BUSY = 5
    TRANSPORT_FAILURE = 6
    TARGET_FAILURE = 7
    NEXUS_FAILURE = 8
    FAILURE = 9
    FUNCTION_SUCCEEDED = 10
    FUNCTION_REJECTED = 11
    INCORRECT_LUN = 12


class TaskAttribute(enum.IntEnum):
    """virtio 1.2 5.6.6.1 task_attr (SAM-5 task attributes)."""

    SIMPLE = 0
    ORDERED = 1
    HEAD = 2
    ACA = 3


class TmfSubtype(enum.IntEnum):
    """virtio 1.2 5.6.6.2: the eight task management function subtypes."""

    ABORT_TASK = 0
    ABORT_TASK_SET = 1
    CLEAR_ACA = 2
    CLEAR_TASK_SET = 3
    I_T_NEXUS_RESET = 4
    LOGICAL_UNIT_RESET = 5
    QUERY_TASK = 6
    QUERY_TASK_SET = 7


class ScsiStatus(enum.IntEnum):
    """SAM-5 5.3 status codes."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


@dataclass(frozen=True)
class InitiatorPort:
    """An initiator port: one I_T nexus with the target (SAM-5 4.6).

    Each vfio-user attachment and each Xen vscsi device is one. ``name`` is an
    iSCSI-format name (SPC-4 7.6.4.6), stable across guest reboots, and is
    what LUN maps and persistent reservations key on.
    """

    name: str

    def transport_id(self) -> bytes:
        """SPC-4 7.6.4.6: iSCSI TransportID, FORMAT CODE 00b, protocol identifier 5.

        The name is NUL-terminated and padded to a multiple of four bytes.
        """
        raw = self.name.encode() + b"\0"
        raw += b"\0" * (-len(raw) % 4)
        if len(raw) < 20:  # minimum TransportID length is 24 bytes (4 + 20)
            raw += b"\0" * (20 - len(raw))
        return struct.pack(">BBH", 0x05, 0, len(raw)) + raw


def lun_from_virtio(lun: bytes) -> tuple[int, int] | None:
    """virtio 1.2 5.6.6.1: byte 0 is 1, byte 1 the target, bytes 2-3 a single-level LUN.

    Returns (target, lun) or None when the address is not in that form. The
    Linux driver always sets the flat-space bits (0x40) in byte 2; peripheral
    addressing (0x00) is accepted too.
    """
    if len(lun) != 8 or lun[0] != 1 or any(lun[4:8]):
        return None
    method = lun[2] >> 6
    if method not in (0, 1):
        return None
    return lun[1], ((lun[2] & 0x3F) << 8) | lun[3]


def lun_to_virtio(lun: int, target: int = 0) -> bytes:
    """Encode a LUN the way Linux's virtio_scsi does (flat space addressing, SAM-5 4.7.7)."""
    return bytes((1, target, 0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0))


# virtio 1.2 5.6.6.1: REPORT LUNS well-known logical unit, C1h 01h.
REPORT_LUNS_WLUN = bytes((1, 0, 0xC1, 0x01, 0, 0, 0, 0))
REPORT_LUNS_WLUN_ADDR = 0xC101


@dataclass
class ScsiRequest:
    """virtio_scsi_req_cmd, with its data buffers already resolved to memoryviews.

    ``data_out`` holds what the initiator sends (device-readable), ``data_in``
    where the target writes (device-writable): views straight over guest
    memory, never copies.
    """

    lun: bytes
    tag: int
    cdb: bytes | memoryview
    initiator: InitiatorPort
    task_attr: int = TaskAttribute.SIMPLE
    prio: int = 0
    crn: int = 0
    data_out: list[memoryview] = field(default_factory=list)
    data_in: list[memoryview] = field(default_factory=list)

    @property
    def data_out_len(self) -> int:
        return sum(len(b) for b in self.data_out)

    @property
    def data_in_len(self) -> int:
        return sum(len(b) for b in self.data_in)


@dataclass
class ScsiResponse:
    """virtio_scsi_resp_cmd: response code, SCSI status, sense, residual."""

    response: VirtioScsiResponse = VirtioScsiResponse.OK
    status: int = ScsiStatus.GOOD
    sense: bytes = b""
    residual: int = 0
    status_qualifier: int = 0


def command_starter(
    target: object,
) -> Callable[[ScsiRequest], ScsiResponse | Awaitable[ScsiResponse]]:
    """How a transport starts a command: the target's ``submit`` (its response when it
    completed at once, else an awaitable that finishes it), or for a target with only
    ``execute`` that coroutine (every command then runs as a task)."""
    submit = getattr(target, "submit", None)
    return submit if submit is not None else target.execute  # type: ignore[attr-defined]


@dataclass
class TmfRequest:
    """virtio_scsi_ctrl_tmf_req (type VIRTIO_SCSI_T_TMF)."""

    subtype: TmfSubtype
    lun: bytes
    tag: int
    initiator: InitiatorPort


@dataclass
class TmfResponse:
    """virtio_scsi_ctrl_tmf_resp: FUNCTION_SUCCEEDED / FUNCTION_COMPLETE (OK) / REJECTED ..."""

    response: VirtioScsiResponse
