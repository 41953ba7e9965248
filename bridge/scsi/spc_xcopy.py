"""EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 6.4, 6.18): the target's copy
manager, block to block within and across the logical units an initiator sees.

Supported descriptors: CSCD descriptor E4h (identification descriptor: an NAA
designator of an LU of this target that the initiator has mapped, peripheral device
type 0) and segment descriptor 02h (block device to block device). Every descriptor
and every segment's range is checked before any data moves, so a copy either fails
at validation (nothing written, no copy status held) or runs segment by segment.
Data move in pieces of COPY_CHUNK_BYTES (read into a host buffer, write from it),
abortable between pieces.

Copy status (RECEIVE COPY RESULTS, COPY STATUS) is held per (initiator, list
identifier) for copies that ran with LIST ID USAGE 00b or 01b, until reported once
or replaced; up to MAX_HELD per initiator (the oldest is discarded first).
"""

from __future__ import annotations

import struct
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .cdb import u16, u32, u64
from .command import Command, CommandRows
from .reservations.commands import ReservationConflictStatus
from .sbc import medium_error
from .sense import (
    FieldPointer,
    SenseError,
    SenseKey,
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
    parameter_list_length_error,
)

if TYPE_CHECKING:
    from .logical_unit import LogicalUnit
    from .target import Target

ROWS = CommandRows()

# Operating parameters (SPC-4 6.18.4), also in the Third-party Copy VPD page.
MAX_CSCD_DESCRIPTORS = 4
MAX_SEGMENT_DESCRIPTORS = 16
MAX_DESCRIPTOR_LIST_LENGTH = 1024
MAX_SEGMENT_BYTES = 64 << 20
COPY_CHUNK_BYTES = 1 << 20
MAX_HELD = 16

CSCD_IDENTIFICATION = 0xE4
SEGMENT_BLOCK_TO_BLOCK = 0x02
IMPLEMENTED_DESCRIPTORS = bytes((SEGMENT_BLOCK_TO_BLOCK, CSCD_IDENTIFICATION))
HEADER_LEN = 16
CSCD_LEN = 32
SEGMENT_02_LEN = 28
DESIGNATOR_TYPE_NAA = 3

# SPC-4 6.18.3 COPY MANAGER STATUS
COPY_COMPLETED = 0x01
COPY_COMPLETED_WITH_ERRORS = 0x02


def copy_aborted(asc: int, ascq: int, segment: int | None = None) -> SenseError:
    """SPC-4 6.4.3: COPY ABORTED; INFORMATION carries the failing segment's number."""
    return SenseError(SenseKey.COPY_ABORTED, asc, ascq, information=segment)


def unreachable_copy_target() -> SenseError:
    return copy_aborted(0x08, 0x04)  # UNREACHABLE COPY TARGET


@dataclass
class Segment:
    src: LogicalUnit
    dst: LogicalUnit
    src_lba: int
    dst_lba: int
    nbytes: int


@dataclass
class CopyStatus:
    status: int
    segments_processed: int
    nbytes: int


# Target -> initiator -> list identifier -> status (the copy manager is the target's).
_HELD: weakref.WeakKeyDictionary[Target, dict[str, OrderedDict[int, CopyStatus]]] = (
    weakref.WeakKeyDictionary())


def held_results(cmd: Command) -> OrderedDict[int, CopyStatus]:
    """The copy statuses held for this initiator."""
    return _HELD.setdefault(cmd.target, {}).setdefault(cmd.initiator, OrderedDict())


def resolve_cscd(cmd: Command, desc: bytes, offset: int) -> LogicalUnit:
    """SPC-4 6.4.5.6 identification descriptor CSCD -> one of the initiator's LUs."""
    if desc[1] & 0x1F != 0:  # PERIPHERAL DEVICE TYPE: only direct access
        raise invalid_field_in_parameter_list(offset + 1, 4)
    # SPC-4: LU ID TYPE is ignored for this descriptor; NUL is obsolete.
    code_set, dtype, dlen = desc[4] & 0x0F, desc[5] & 0x3F, desc[7]
    value = desc[8 : 8 + min(dlen, 20)]
    target = cmd.target
    lu = None
    if code_set == 1 and dtype == DESIGNATOR_TYPE_NAA:  # binary NAA, LU association
        # Only LUs this initiator sees: a copy reaches no more than the initiator could.
        for name in target.lun_maps().get(cmd.initiator, {}).values():
            cand = target.logical_unit(name)
            if cand.identity.wwn == value:
                lu = cand
                break
    if lu is None:
        raise unreachable_copy_target()
    block_length = int.from_bytes(desc[29:32], "big")
    if block_length != lu.block_size:
        raise invalid_field_in_parameter_list(offset + 29)
    return lu


def parse_segment(cmd: Command, desc: bytes, offset: int, cscds: list[LogicalUnit],
                  number: int) -> Segment:
    """SPC-4 6.4.6.5 block device to block device segment descriptor (02h)."""
    if u16(desc, 2) != SEGMENT_02_LEN - 4:
        raise invalid_field_in_parameter_list(offset + 2)
    si, di = u16(desc, 4), u16(desc, 6)
    if si >= len(cscds) or di >= len(cscds):
        raise unreachable_copy_target()
    src, dst = cscds[si], cscds[di]
    dc = bool(desc[1] & 0x02)  # NUMBER OF BLOCKS counts destination (1) or source blocks
    nblocks = u16(desc, 10)
    nbytes = nblocks * (dst.block_size if dc else src.block_size)
    if nbytes % src.block_size or nbytes % dst.block_size:
        raise invalid_field_in_parameter_list(offset + 10)
    if nbytes > MAX_SEGMENT_BYTES:
        raise invalid_field_in_parameter_list(offset + 10)
    src_lba, dst_lba = u64(desc, 12), u64(desc, 20)
    if (src_lba * src.block_size + nbytes > src.num_blocks * src.block_size
            or dst_lba * dst.block_size + nbytes > dst.num_blocks * dst.block_size):
        # SPC-4 6.4.3: the copy target reports the LBA out of range: COPY ABORTED
        raise copy_aborted(0x00, 0x00, number)
    if dst.read_only:
        raise copy_aborted(0x27, 0x00, number)  # WRITE PROTECTED
    return Segment(src, dst, src_lba, dst_lba, nbytes)


def parse_parameter_list(cmd: Command, data: bytes) -> tuple[int, int, list[Segment]]:
    """(list identifier, list id usage, segments); every check SPC-4 6.4 asks first."""
    list_id, flags = data[0], data[1]
    usage = (flags >> 3) & 0x3
    if flags & 0x20:  # STR (sequential striped): no stream devices here
        raise invalid_field_in_parameter_list(1, 5)
    if usage == 0x3 and list_id != 0:  # 11b: no list identifier
        raise invalid_field_in_parameter_list(0)
    cscd_len, seg_len, inline_len = u16(data, 2), u32(data, 8), u32(data, 12)
    if inline_len:
        raise invalid_field_in_parameter_list(12)  # MAXIMUM INLINE DATA LENGTH is 0
    if cscd_len + seg_len > MAX_DESCRIPTOR_LIST_LENGTH:
        raise parameter_list_length_error()
    if len(data) < HEADER_LEN + cscd_len + seg_len:
        raise parameter_list_length_error()
    if cscd_len % CSCD_LEN:
        raise parameter_list_length_error()
    if cscd_len // CSCD_LEN > MAX_CSCD_DESCRIPTORS:
        raise SenseError(SenseKey.ILLEGAL_REQUEST, 0x26, 0x06)  # TOO MANY TARGET DESCRIPTORS
    cscds = []
    for off in range(HEADER_LEN, HEADER_LEN + cscd_len, CSCD_LEN):
        desc = data[off : off + CSCD_LEN]
        if desc[0] != CSCD_IDENTIFICATION:
            # UNSUPPORTED TARGET DESCRIPTOR TYPE CODE
            raise SenseError(SenseKey.ILLEGAL_REQUEST, 0x26, 0x07, FieldPointer(off, None, False))
        cscds.append(resolve_cscd(cmd, desc, off))
    segments: list[Segment] = []
    off, end = HEADER_LEN + cscd_len, HEADER_LEN + cscd_len + seg_len
    while off < end:
        if len(segments) == MAX_SEGMENT_DESCRIPTORS:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, 0x26, 0x08)  # TOO MANY SEGMENT DESCRIPTORS
        if end - off < 4:
            raise parameter_list_length_error()
        code, length = data[off], 4 + u16(data, off + 2)
        if code != SEGMENT_BLOCK_TO_BLOCK:
            # UNSUPPORTED SEGMENT DESCRIPTOR TYPE CODE
            raise SenseError(SenseKey.ILLEGAL_REQUEST, 0x26, 0x09, FieldPointer(off, None, False))
        if off + length > end:
            raise parameter_list_length_error()
        segments.append(parse_segment(cmd, data[off : off + length], off, cscds, len(segments)))
        off += length
    return list_id, usage, segments


def check_reservations(cmd: Command, segments: list[Segment]) -> None:
    """The copy reads and writes other LUs for this initiator: their reservations apply
    as to a READ(16)/WRITE(16) from it (SPC-4 5.13)."""
    for seg in segments:
        for lu, op in ((seg.src, 0x88), (seg.dst, 0x8A)):
            if lu is not cmd.lu and lu.reservations.conflicts(cmd.initiator, bytes((op,)) + bytes(15)):
                raise ReservationConflictStatus()


async def copy_segment(seg: Segment) -> None:
    """Copy ``seg`` in pieces; backwards when an overlapping destination lies ahead."""
    src_off, dst_off = seg.src_lba * seg.src.block_size, seg.dst_lba * seg.dst.block_size
    n = seg.nbytes
    pieces = [(p, min(COPY_CHUNK_BYTES, n - p)) for p in range(0, n, COPY_CHUNK_BYTES)]
    if seg.src is seg.dst and src_off < dst_off < src_off + n:
        pieces.reverse()
    buf = bytearray(min(COPY_CHUNK_BYTES, n))
    sync = not seg.dst.mode.wce
    for pos, k in pieces:
        view = memoryview(buf)[:k]
        try:
            async with seg.src.write_gate.shared():
                await seg.src.backing.read_into(src_off + pos, [view])
        except OSError as e:
            raise medium_error("read", e) from None
        try:
            async with seg.dst.write_gate.shared():
                await seg.dst.backing.write_from(dst_off + pos, [view], sync=sync)
        except OSError as e:
            raise medium_error("write", e) from None


@ROWS.command(0x83, 0x00, "EXTENDED COPY(LID1)", "83 00 00 00 00 00 00 00 00 00 ff ff ff ff 00 00",
              medium=True)
async def extended_copy(cmd: Command) -> None:
    """SPC-4 6.4 (LID1). A PARAMETER LIST LENGTH of 0 is not an error: nothing to do."""
    plen = u32(cmd.cdb, 10)
    if plen == 0:
        return
    if plen < HEADER_LEN:
        raise parameter_list_length_error()
    if plen > HEADER_LEN + MAX_DESCRIPTOR_LIST_LENGTH:
        raise parameter_list_length_error()
    data = cmd.receive(plen)
    list_id, usage, segments = parse_parameter_list(cmd, data)
    check_reservations(cmd, segments)
    held = held_results(cmd)
    hold = usage in (0, 1)
    if hold:
        held.pop(list_id, None)
    done = 0
    nbytes = 0
    try:
        for seg in segments:
            await copy_segment(seg)
            done += 1
            nbytes += seg.nbytes
    except SenseError as e:
        if hold:
            remember(held, list_id, CopyStatus(COPY_COMPLETED_WITH_ERRORS, done, nbytes))
        s = e.sense
        raise copy_aborted(s.asc, s.ascq, done) from None
    if hold:
        remember(held, list_id, CopyStatus(COPY_COMPLETED, done, nbytes))


def remember(held: OrderedDict[int, CopyStatus], list_id: int, status: CopyStatus) -> None:
    held[list_id] = status
    while len(held) > MAX_HELD:
        held.popitem(last=False)


def operating_parameters() -> bytes:
    """SPC-4 6.18.4: RECEIVE COPY RESULTS, OPERATING PARAMETERS."""
    body = bytearray(44 - 4)
    body[0] = 0x01  # SNLID: LIST ID USAGE 11b (no list identifier) supported
    struct.pack_into(">HHIIIII", body, 4, MAX_CSCD_DESCRIPTORS, MAX_SEGMENT_DESCRIPTORS,
                     MAX_DESCRIPTOR_LIST_LENGTH, MAX_SEGMENT_BYTES, 0, 0, 0)
    struct.pack_into(">H", body, 30, 1)  # TOTAL CONCURRENT COPIES
    body[32] = 1  # MAXIMUM CONCURRENT COPIES
    body[33] = (COPY_CHUNK_BYTES).bit_length() - 1  # DATA SEGMENT GRANULARITY (log2)
    body[39] = len(IMPLEMENTED_DESCRIPTORS)
    body += IMPLEMENTED_DESCRIPTORS
    return struct.pack(">I", len(body)) + bytes(body)


@ROWS.command(0x84, 0x00, "RECEIVE COPY RESULTS(COPY STATUS)",
              "84 00 ff 00 00 00 00 00 00 00 ff ff ff ff 00 00")
async def receive_copy_status(cmd: Command) -> None:
    """SPC-4 6.18.3. Copies run to completion within the EXTENDED COPY command, so a
    held status is final; it is discarded once reported. Unknown list: 24h/00h."""
    held = held_results(cmd)
    status = held.pop(cmd.cdb[2], None)
    if status is None:
        raise invalid_field_in_cdb(2)
    # TRANSFER COUNT UNITS: 00h bytes, 01h KiB, 02h MiB, ... the smallest that fits.
    count, units = status.nbytes, 0
    while count > 0xFFFFFFFF:
        count >>= 10
        units += 1
    data = struct.pack(">IBHBI", 8, status.status, min(status.segments_processed, 0xFFFF),
                       units, count)
    cmd.send(data, u32(cmd.cdb, 10))


@ROWS.command(0x84, 0x03, "RECEIVE COPY RESULTS(OPERATING PARAMETERS)",
              "84 03 00 00 00 00 00 00 00 00 ff ff ff ff 00 00")
async def receive_operating_parameters(cmd: Command) -> None:
    cmd.send(operating_parameters(), u32(cmd.cdb, 10))
