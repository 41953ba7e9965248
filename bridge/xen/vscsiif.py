"""vscsiif wire structures and constants (xen/include/public/io/vscsiif.h).

Plain functions over bytes/memoryview; no I/O. Every value a guest wrote is
returned as is: validating it is the backend's job (see ``validate_request``).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import NamedTuple

VSCSIIF_ACT_SCSI_CDB = 1
VSCSIIF_ACT_SCSI_ABORT = 2
VSCSIIF_ACT_SCSI_RESET = 3
VSCSIIF_ACT_SCSI_SG_PRESET = 4  # deprecated, never accepted

VSCSIIF_SG_TABLESIZE = 26
VSCSIIF_MAX_COMMAND_SIZE = 16
VSCSIIF_SENSE_BUFFERSIZE = 96
VSCSIIF_PAGE_SIZE = 4096
VSCSIIF_SG_GRANT = 0x80  # nr_segments flag: seg[] points at pages of segment arrays

# Linux DMA directions carried in sc_data_direction.
DMA_BIDIRECTIONAL = 0
DMA_TO_DEVICE = 1
DMA_FROM_DEVICE = 2
DMA_NONE = 3

XEN_VSCSIIF_RSLT_RESET_SUCCESS = 0x2002
XEN_VSCSIIF_RSLT_RESET_FAILED = 0x2003


class RsltHost(enum.IntEnum):
    """XEN_VSCSIIF_RSLT_HOST_* (bits 16-23 of rslt)."""

    OK = 0
    NO_CONNECT = 1
    BUS_BUSY = 2
    TIME_OUT = 3
    BAD_TARGET = 4
    ABORT = 5
    PARITY = 6
    ERROR = 7
    RESET = 8
    BAD_INTR = 9
    PASSTHROUGH = 10
    SOFT_ERROR = 11
    IMM_RETRY = 12
    REQUEUE = 13
    TRANSPORT_DISRUPTED = 14
    TRANSPORT_FAILFAST = 15
    TARGET_FAILURE = 16
    NEXUS_FAILURE = 17
    ALLOC_FAILURE = 18
    MEDIUM_ERROR = 19
    TRANSPORT_MARGINAL = 20


def rslt(host: int, status: int) -> int:
    """XEN_VSCSIIF_RSLT_HOST(x) = (x >> 16) & 0xff, XEN_VSCSIIF_RSLT_STATUS(x) = x & 0xff."""
    return ((host & 0xFF) << 16) | (status & 0xFF)


# struct scsiif_request_segment { uint32_t gref; uint16_t offset; uint16_t length; }
SEGMENT = struct.Struct("<IHH")
# struct vscsiif_request: header up to nr_segments, then seg[26], then reserved[3].
REQUEST_HEAD = struct.Struct("<HBB16sHHHHHBB")
REQUEST_SEG_OFFSET = REQUEST_HEAD.size  # 32
REQUEST_SIZE = REQUEST_SEG_OFFSET + VSCSIIF_SG_TABLESIZE * SEGMENT.size + 12  # 252
# struct vscsiif_response: rqid, act, sense_len, sense_buffer[96], rslt, residual_len, reserved[36]
RESPONSE = struct.Struct("<HBB96siI144x")
RESPONSE_SIZE = RESPONSE.size  # 252
SG_PER_PAGE = VSCSIIF_PAGE_SIZE // SEGMENT.size  # VSCSIIF_SG_PER_PAGE

# Field offsets the ABI check compares against vscsiif.h (tests/xen_abi).
REQUEST_OFFSETS = {
    "rqid": 0, "act": 2, "cmd_len": 3, "cmnd": 4, "timeout_per_command": 20,
    "channel": 22, "id": 24, "lun": 26, "ref_rqid": 28, "sc_data_direction": 30,
    "nr_segments": 31, "seg": 32, "reserved": 240,
}
RESPONSE_OFFSETS = {
    "rqid": 0, "act": 2, "sense_len": 3, "sense_buffer": 4, "rslt": 100,
    "residual_len": 104, "reserved": 108,
}
SEGMENT_OFFSETS = {"gref": 0, "offset": 4, "length": 6}


class Segment(NamedTuple):
    """struct scsiif_request_segment (a tuple: requests carry up to 26 + 128 of them)."""

    gref: int
    offset: int
    length: int


@dataclass(frozen=True)
class VscsiifRequest:
    rqid: int
    act: int
    cmd_len: int
    cmnd: bytes
    timeout_per_command: int
    channel: int
    id: int
    lun: int
    ref_rqid: int
    sc_data_direction: int
    nr_segments: int
    seg: tuple[Segment, ...]  # the seg[] entries in use (at most 26; see seg_count)

    @property
    def sg_grant(self) -> bool:
        return bool(self.nr_segments & VSCSIIF_SG_GRANT)

    @property
    def seg_count(self) -> int:
        """Number of seg[] entries in use (low 7 bits with SG_GRANT, else the whole byte)."""
        return self.nr_segments & ~VSCSIIF_SG_GRANT & 0xFF if self.sg_grant else self.nr_segments

    @property
    def cdb(self) -> bytes:
        return self.cmnd[: self.cmd_len]


def decode_request(buf: bytes | memoryview) -> VscsiifRequest:
    """Parse one ring slot. The caller passes a private copy (no double fetch from shared memory)."""
    if len(buf) < REQUEST_SIZE:
        raise ValueError(f"vscsiif request needs {REQUEST_SIZE} bytes, got {len(buf)}")
    (rqid, act, cmd_len, cmnd, timeout, channel, id_, lun, ref_rqid, direction,
     nr_segments) = REQUEST_HEAD.unpack_from(buf, 0)
    used = nr_segments & 0x7F if nr_segments & VSCSIIF_SG_GRANT else nr_segments
    used = min(used, VSCSIIF_SG_TABLESIZE)
    seg = tuple(map(Segment._make, SEGMENT.iter_unpack(
        buf[REQUEST_SEG_OFFSET:REQUEST_SEG_OFFSET + used * SEGMENT.size])))
    return VscsiifRequest(rqid, act, cmd_len, bytes(cmnd), timeout, channel, id_, lun,
                          ref_rqid, direction, nr_segments, seg)


def encode_request(req: VscsiifRequest) -> bytes:
    out = bytearray(REQUEST_SIZE)
    REQUEST_HEAD.pack_into(out, 0, req.rqid, req.act, req.cmd_len, req.cmnd.ljust(16, b"\0")[:16],
                           req.timeout_per_command, req.channel, req.id, req.lun, req.ref_rqid,
                           req.sc_data_direction, req.nr_segments)
    for i, s in enumerate(req.seg[:VSCSIIF_SG_TABLESIZE]):
        SEGMENT.pack_into(out, REQUEST_SEG_OFFSET + i * SEGMENT.size, s.gref, s.offset, s.length)
    return bytes(out)


@dataclass(frozen=True)
class VscsiifResponse:
    rqid: int
    rslt: int
    sense: bytes = b""
    residual_len: int = 0
    act: int = 0


def encode_response(rsp: VscsiifResponse) -> bytes:
    sense = rsp.sense[:VSCSIIF_SENSE_BUFFERSIZE]
    return RESPONSE.pack(rsp.rqid & 0xFFFF, rsp.act & 0xFF, len(sense), sense,
                         rsp.rslt, rsp.residual_len & 0xFFFFFFFF)


def decode_response(buf: bytes | memoryview) -> VscsiifResponse:
    rqid, act, sense_len, sense, rslt_, residual = RESPONSE.unpack_from(buf, 0)
    return VscsiifResponse(rqid, rslt_, bytes(sense[: min(sense_len, VSCSIIF_SENSE_BUFFERSIZE)]),
                           residual, act)


def decode_segments(page: bytes | memoryview, offset: int, length: int) -> list[Segment]:
    """The scsiif_request_segment array an SG_GRANT seg[] entry points at (bounds already checked)."""
    end = offset + length - length % SEGMENT.size
    return list(map(Segment._make, SEGMENT.iter_unpack(page[offset:end])))
