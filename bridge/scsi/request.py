"""The core's request and response types: what every transport hands the target core.

Transport-neutral (SAM-5 5.1 Execute Command, 7 task management functions): LUNs are
integers, responses are SAM-5 service responses. Each transport owns the mapping
from its own wire form (virtio's 8-byte LUN and response codes in
bridge/virtio/scsi_wire.py, vscsiif's v-dev and host bytes in bridge/xen/translate.py).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

# SAM-5 4.7.7 flat space addressing: the widest single-level LUN (and virtio's max_lun).
MAX_LUN = 0x3FFF

# SPC-4 7.2 / SAM-5 4.7.5: the REPORT LUNS well-known logical unit (W-LUN C101h), as the
# integer a transport gives the core when the initiator addressed it.
REPORT_LUNS_WLUN = 0xC101


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


class TaskAttribute(enum.IntEnum):
    """SAM-5 8.6 task attributes (virtio's task_attr uses the same numbers)."""

    SIMPLE = 0
    ORDERED = 1
    HEAD = 2
    ACA = 3


class ServiceResponse(enum.Enum):
    """How a command ended (SAM-5 5.1): COMMAND COMPLETE carries a status; the others
    are failures a transport reports in its own way (virtio response codes, vscsiif
    host bytes)."""

    COMMAND_COMPLETE = enum.auto()
    # The data buffer in the command's direction is shorter than its transfer:
    # nothing was done (QEMU answers virtio OVERRUN the same way).
    DATA_OVERRUN = enum.auto()
    # Ended by ABORT TASK, ABORT TASK SET, CLEAR TASK SET, PREEMPT AND ABORT or an unmap
    # (SAM-5 5.6).
    TASK_ABORTED = enum.auto()
    # Ended by a reset: LOGICAL UNIT RESET, I_T NEXUS RESET, an I_T nexus loss (SAM-5 6.3).
    # Transports that tell the two apart answer it as a reset (virtio 1.2 5.6.6.1:
    # VIRTIO_SCSI_S_RESET "cancelled due to a bus or device reset"), which initiators
    # retry; the others as TASK_ABORTED.
    TASK_ABORTED_BY_RESET = enum.auto()
    # The request cannot be delivered as given (both data-in and data-out buffers:
    # the core has no bidirectional commands).
    SERVICE_DELIVERY_FAILURE = enum.auto()
    # An internal error of the target (SAM-5: SERVICE DELIVERY OR TARGET FAILURE).
    TARGET_FAILURE = enum.auto()
    # The target port is down (ports.py, the control plane's port.down): the command
    # never reached the device server, as over a failed link. Each transport answers
    # its link-loss code (virtio TRANSPORT_FAILURE, vscsiif DID_NO_CONNECT).
    PORT_DOWN = enum.auto()


class TaskManagementFunction(enum.Enum):
    """SAM-5 7: the task management functions the core implements."""

    ABORT_TASK = enum.auto()
    ABORT_TASK_SET = enum.auto()
    CLEAR_ACA = enum.auto()
    CLEAR_TASK_SET = enum.auto()
    I_T_NEXUS_RESET = enum.auto()
    LOGICAL_UNIT_RESET = enum.auto()
    QUERY_TASK = enum.auto()
    QUERY_TASK_SET = enum.auto()


class TmfServiceResponse(enum.Enum):
    """SAM-5 7.1 task management function service responses."""

    FUNCTION_COMPLETE = enum.auto()
    FUNCTION_SUCCEEDED = enum.auto()
    FUNCTION_REJECTED = enum.auto()
    INCORRECT_LOGICAL_UNIT_NUMBER = enum.auto()
    SERVICE_DELIVERY_OR_TARGET_FAILURE = enum.auto()


@dataclass(frozen=True)
class InitiatorPort:
    """An initiator port (SAM-5 4.6): with a target port, one I_T nexus.

    ``name`` is an iSCSI-format name (SPC-4 7.6.4.6), stable across guest reboots;
    LUN maps and persistent reservations key on it.
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


@dataclass(frozen=True)
class TargetPort:
    """A target port (SAM-5 4.6): a vfio-user attachment or a Xen vscsi device.

    ``relative_id`` is the RELATIVE TARGET PORT IDENTIFIER of SPC-4 7.8.6.5 (1-based).
    ``max_transfer_bytes`` is the most data one command can carry through this port,
    as the transport told the initiator's driver (virtio max_sectors x 512); None when
    the transport has no such limit. The core reports and enforces it in logical
    blocks (block_limits.py).
    """

    name: str
    relative_id: int = 1
    max_transfer_bytes: int | None = None


@dataclass(slots=True)  # built once per command: slots are faster to make and read
class ScsiRequest:
    """One command (SAM-5 5.1 Execute Command), its buffers resolved to memoryviews.

    ``data_out`` holds what the initiator sends, ``data_in`` where the target writes:
    views straight over guest memory, never copies. ``lun`` is an integer: a LUN of the
    initiator's map, or REPORT_LUNS_WLUN.
    """

    lun: int
    tag: int
    cdb: bytes | memoryview
    initiator: InitiatorPort
    task_attr: int = TaskAttribute.SIMPLE
    prio: int = 0
    crn: int = 0
    data_out: list[memoryview] = field(default_factory=list)
    data_in: list[memoryview] = field(default_factory=list)
    target_port: TargetPort | None = None

    @property
    def data_out_len(self) -> int:
        return sum(len(b) for b in self.data_out)

    @property
    def data_in_len(self) -> int:
        return sum(len(b) for b in self.data_in)


@dataclass(slots=True)  # built once per command: slots are faster to make and read
class ScsiResponse:
    """The outcome of a command: service response, status, sense, residual.

    Never changed once made: the core answers every GOOD without residual with one
    shared instance."""

    response: ServiceResponse = ServiceResponse.COMMAND_COMPLETE
    status: int = ScsiStatus.GOOD
    sense: bytes = b""
    residual: int = 0
    status_qualifier: int = 0


# COMMAND COMPLETE, GOOD, no sense, no residual: the core answers every such command
# with this one instance (a transport may test ``is GOOD_RESPONSE`` to encode it once).
GOOD_RESPONSE = ScsiResponse()


@dataclass
class TmfRequest:
    """One task management function (SAM-5 7) for the LUN ``lun`` of ``initiator``."""

    function: TaskManagementFunction
    lun: int
    tag: int
    initiator: InitiatorPort


@dataclass
class TmfResponse:
    response: TmfServiceResponse
