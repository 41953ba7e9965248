"""virtio-scsi wire structures (virtio 1.2 5.6.6; linux/virtio_scsi.h), sans-I/O.

All little-endian. Parsing takes bytes already gathered from a chain's
device-readable part; encoding returns bytes to scatter over its writable part.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import NamedTuple

from bridge.scsi.request import (
    GOOD_RESPONSE,
    MAX_LUN,
    REPORT_LUNS_WLUN,
    ScsiResponse,
    ServiceResponse,
    TaskManagementFunction,
    TmfServiceResponse,
)

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


# The core's service responses in virtio's words (as QEMU's virtio-scsi answers them).
RESPONSE_CODE: dict[ServiceResponse, int] = {
    ServiceResponse.COMMAND_COMPLETE: VirtioScsiResponse.OK,
    ServiceResponse.DATA_OVERRUN: VirtioScsiResponse.OVERRUN,
    ServiceResponse.TASK_ABORTED: VirtioScsiResponse.ABORTED,
    # virtio 1.2 5.6.6.1: "cancelled due to a bus or device reset" (QEMU answers the same
    # for requests its device reset cancels; Linux retries them, DID_RESET).
    ServiceResponse.TASK_ABORTED_BY_RESET: VirtioScsiResponse.RESET,
    ServiceResponse.SERVICE_DELIVERY_FAILURE: VirtioScsiResponse.FAILURE,
    ServiceResponse.TARGET_FAILURE: VirtioScsiResponse.TARGET_FAILURE,
    # A failed link (the control plane's port.down): Linux makes it DID_TRANSPORT_DISRUPTED,
    # which fails the path at once for dm-multipath's fail-fast requests.
    ServiceResponse.PORT_DOWN: VirtioScsiResponse.TRANSPORT_FAILURE,
}

# virtio 1.2 5.6.6.2: TMF subtypes -> SAM-5 task management functions.
TMF_SUBTYPES: dict[int, TaskManagementFunction] = {
    0: TaskManagementFunction.ABORT_TASK,
    1: TaskManagementFunction.ABORT_TASK_SET,
    2: TaskManagementFunction.CLEAR_ACA,
    3: TaskManagementFunction.CLEAR_TASK_SET,
    4: TaskManagementFunction.I_T_NEXUS_RESET,
    5: TaskManagementFunction.LOGICAL_UNIT_RESET,
    6: TaskManagementFunction.QUERY_TASK,
    7: TaskManagementFunction.QUERY_TASK_SET,
}
TMF_SUBTYPE_OF = {fn: n for n, fn in TMF_SUBTYPES.items()}

# virtio 1.2 5.6.6.2: FUNCTION COMPLETE is OK; a failure of the target is FAILURE.
TMF_RESPONSE_CODE: dict[TmfServiceResponse, int] = {
    TmfServiceResponse.FUNCTION_COMPLETE: VirtioScsiResponse.OK,
    TmfServiceResponse.FUNCTION_SUCCEEDED: VirtioScsiResponse.FUNCTION_SUCCEEDED,
    TmfServiceResponse.FUNCTION_REJECTED: VirtioScsiResponse.FUNCTION_REJECTED,
    TmfServiceResponse.INCORRECT_LOGICAL_UNIT_NUMBER: VirtioScsiResponse.INCORRECT_LUN,
    TmfServiceResponse.SERVICE_DELIVERY_OR_TARGET_FAILURE: VirtioScsiResponse.FAILURE,
}

# virtio 1.2 5.6.6.1: the REPORT LUNS well-known logical unit, C1h 01h.
REPORT_LUNS_WLUN_FIELD = bytes((1, 0, 0xC1, 0x01, 0, 0, 0, 0))


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


def decode_lun(lun: bytes) -> int | None:
    """The core's LUN for a virtio LUN field, or None (virtio BAD_TARGET): this device
    has one target (max_target 0) with single-level LUNs and the REPORT LUNS W-LUN."""
    if lun == REPORT_LUNS_WLUN_FIELD:
        return REPORT_LUNS_WLUN
    parsed = lun_from_virtio(lun)
    if parsed is None or parsed[0] != 0 or parsed[1] > MAX_LUN:
        return None
    return parsed[1]


def lun_to_virtio(lun: int, target: int = 0) -> bytes:
    """Encode a LUN the way Linux's virtio_scsi does (flat space addressing, SAM-5 4.7.7)."""
    if lun == REPORT_LUNS_WLUN:
        return REPORT_LUNS_WLUN_FIELD
    return bytes((1, target, 0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0))

# virtio 1.2 5.6.3 feature bits
VIRTIO_SCSI_F_INOUT = 0
VIRTIO_SCSI_F_HOTPLUG = 1
VIRTIO_SCSI_F_CHANGE = 2
VIRTIO_SCSI_F_T10_PI = 3

# virtio 1.2 5.6.6.2 control queue request types
VIRTIO_SCSI_T_TMF = 0
VIRTIO_SCSI_T_AN_QUERY = 1
VIRTIO_SCSI_T_AN_SUBSCRIBE = 2

# virtio 1.2 5.6.6.3 events
VIRTIO_SCSI_T_NO_EVENT = 0
VIRTIO_SCSI_T_TRANSPORT_RESET = 1
VIRTIO_SCSI_T_ASYNC_NOTIFY = 2
VIRTIO_SCSI_T_PARAM_CHANGE = 3
VIRTIO_SCSI_T_EVENTS_MISSED = 0x80000000
VIRTIO_SCSI_EVT_RESET_HARD = 0
VIRTIO_SCSI_EVT_RESET_RESCAN = 1
VIRTIO_SCSI_EVT_RESET_REMOVED = 2

CMD_REQ_FIXED_SIZE = 19  # lun[8], id le64, task_attr, prio, crn; then cdb[cdb_size]
CMD_RESP_FIXED_SIZE = 12  # sense_len, resid, status_qualifier, status, response; then sense[]
CMD_RESP_RESPONSE_OFFSET = 11
TMF_REQ_SIZE = 24  # type, subtype, lun[8], id
TMF_RESP_SIZE = 1
AN_REQ_SIZE = 16  # type, lun[8], event_requested
AN_RESP_SIZE = 5  # event_actual, response
EVENT_SIZE = 16  # event, lun[8], reason

_CMD_REQ = struct.Struct("<8sQBBB")
_CMD_RESP = struct.Struct("<IIHBB")
_TMF_REQ = struct.Struct("<II8sQ")
_AN_REQ = struct.Struct("<I8sI")
_AN_RESP = struct.Struct("<IB")
_EVENT = struct.Struct("<I8sI")
_U32 = struct.Struct("<I")


class CmdReqHeader(NamedTuple):
    lun: bytes
    tag: int
    task_attr: int
    prio: int
    crn: int
    cdb: bytes


def cmd_req_size(cdb_size: int) -> int:
    return CMD_REQ_FIXED_SIZE + cdb_size


def cmd_resp_size(sense_size: int) -> int:
    return CMD_RESP_FIXED_SIZE + sense_size


def parse_cmd_req(raw: bytes | memoryview, cdb_size: int) -> CmdReqHeader:
    """virtio_scsi_req_cmd with the negotiated cdb_size; ``raw`` must be long enough
    (a view of guest memory is read once: the CDB is copied)."""
    lun, tag, attr, prio, crn = _CMD_REQ.unpack_from(raw, 0)
    cdb = bytes(raw[CMD_REQ_FIXED_SIZE : CMD_REQ_FIXED_SIZE + cdb_size])
    return CmdReqHeader(lun, tag, attr, prio, crn, cdb)


def encode_cmd_resp(resp: ScsiResponse, sense_size: int) -> bytes:
    """virtio_scsi_resp_cmd as bytes (for a response split over several buffers)."""
    buf = bytearray(CMD_RESP_FIXED_SIZE + sense_size)
    encode_cmd_resp_into(memoryview(buf), resp, sense_size)
    return bytes(buf)


_ZEROS = memoryview(bytes(4096))
_good_encoded = b""  # GOOD_RESPONSE encoded for the last sense_size used


def encode_cmd_resp_into(buf: memoryview, resp: ScsiResponse, sense_size: int) -> None:
    """virtio_scsi_resp_cmd written into ``buf`` (cmd_resp_size(sense_size) bytes); sense
    beyond ``sense_size`` is cut (sense_len says what fits)."""
    global _good_encoded
    if resp is GOOD_RESPONSE:  # most responses: one copy of bytes encoded once
        good = _good_encoded
        if len(good) != CMD_RESP_FIXED_SIZE + sense_size:
            good = _good_encoded = encode_cmd_resp(ScsiResponse(), sense_size)
        buf[: len(good)] = good
        return
    sense = resp.sense
    n = min(len(sense), sense_size)
    resid = max(0, min(resp.residual, 0xFFFFFFFF))
    _CMD_RESP.pack_into(
        buf, 0, n, resid, resp.status_qualifier & 0xFFFF, int(resp.status) & 0xFF,
        RESPONSE_CODE[resp.response],
    )
    start = CMD_RESP_FIXED_SIZE
    if n:
        buf[start : start + n] = sense[:n]
        start += n
    pad = sense_size - n
    buf[start : start + pad] = _ZEROS[:pad] if pad <= len(_ZEROS) else bytes(pad)


def encode_cmd_failure(response: int, sense_size: int) -> bytes:
    """A command response carrying only a virtio response code (no SCSI status)."""
    return _CMD_RESP.pack(0, 0, 0, 0, response & 0xFF) + bytes(sense_size)


def ctrl_type(raw: bytes) -> int | None:
    """The le32 type that starts every control queue request."""
    if len(raw) < 4:
        return None
    return _U32.unpack_from(raw, 0)[0]


@dataclass(frozen=True)
class TmfReq:
    subtype: int
    lun: bytes
    tag: int


def parse_tmf_req(raw: bytes) -> TmfReq:
    _type, subtype, lun, tag = _TMF_REQ.unpack_from(raw, 0)
    return TmfReq(subtype, lun, tag)


@dataclass(frozen=True)
class AnReq:
    type: int
    lun: bytes
    event_requested: int


def parse_an_req(raw: bytes) -> AnReq:
    typ, lun, requested = _AN_REQ.unpack_from(raw, 0)
    return AnReq(typ, lun, requested)


def encode_an_resp(event_actual: int, response: int) -> bytes:
    return _AN_RESP.pack(event_actual, response)


def encode_event(event: int, lun: bytes, reason: int) -> bytes:
    return _EVENT.pack(event & 0xFFFFFFFF, lun, reason & 0xFFFFFFFF)


def event_lun(lun: int, target: int = 0) -> bytes:
    """LUN field of an event, encoded as REPORT LUNS does: peripheral (00 nn)
    below 256, flat space (0x40 | hi) above (SAM-5 4.7.7; QEMU virtio_scsi_push_event)."""
    if lun < 256:
        return bytes((1, target, 0, lun, 0, 0, 0, 0))
    return bytes((1, target, 0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0))
