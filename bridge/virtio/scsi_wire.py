"""virtio-scsi wire structures (virtio 1.2 5.6.6; linux/virtio_scsi.h), sans-I/O.

All little-endian. Parsing takes bytes already gathered from a chain's
device-readable part; encoding returns bytes to scatter over its writable part.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from bridge.virtio.scsi_request import ScsiResponse

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


def parse_cmd_req(raw: bytes, cdb_size: int) -> CmdReqHeader:
    """virtio_scsi_req_cmd with the negotiated cdb_size; ``raw`` must be long enough."""
    lun, tag, attr, prio, crn = _CMD_REQ.unpack_from(raw, 0)
    cdb = raw[CMD_REQ_FIXED_SIZE : CMD_REQ_FIXED_SIZE + cdb_size]
    return CmdReqHeader(lun, tag, attr, prio, crn, cdb)


def encode_cmd_resp(resp: ScsiResponse, sense_size: int) -> bytes:
    """virtio_scsi_resp_cmd as bytes (for a response split over several buffers)."""
    buf = bytearray(CMD_RESP_FIXED_SIZE + sense_size)
    encode_cmd_resp_into(memoryview(buf), resp, sense_size)
    return bytes(buf)


_ZEROS = memoryview(bytes(4096))


def encode_cmd_resp_into(buf: memoryview, resp: ScsiResponse, sense_size: int) -> None:
    """virtio_scsi_resp_cmd written into ``buf`` (cmd_resp_size(sense_size) bytes); sense
    beyond ``sense_size`` is cut (sense_len says what fits)."""
    sense = resp.sense
    n = min(len(sense), sense_size)
    resid = max(0, min(resp.residual, 0xFFFFFFFF))
    _CMD_RESP.pack_into(
        buf, 0, n, resid, resp.status_qualifier & 0xFFFF, int(resp.status) & 0xFF,
        int(resp.response) & 0xFF,
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
