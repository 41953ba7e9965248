"""Vital product data pages (SPC-4 7.8, SBC-3 6.6): 00h, 80h, 83h, 8Fh, B0h, B1h, B2h.

Each builder returns the page body after the 4-byte page header.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import block_limits as bl

if TYPE_CHECKING:
    from .command import Command
    from .logical_unit import LogicalUnit

PROTOCOL_ISCSI = 0x5  # SPC-4 7.6.1: initiator/target port names are iSCSI-format names
CODE_SET_BINARY, CODE_SET_ASCII, CODE_SET_UTF8 = 1, 2, 3
ASSOC_LU, ASSOC_TARGET_PORT, ASSOC_TARGET_DEVICE = 0, 1, 2
TYPE_T10, TYPE_NAA, TYPE_RELATIVE_TARGET_PORT, TYPE_SCSI_NAME = 1, 3, 4, 8
TYPE_TARGET_PORT_GROUP = 5  # SPC-4 7.8.6.6


def designator(code_set: int, assoc: int, dtype: int, value: bytes, piv: bool = False) -> bytes:
    """SPC-4 7.8.6.1 identification descriptor."""
    b0 = (PROTOCOL_ISCSI << 4 if piv else 0) | code_set
    b1 = (0x80 if piv else 0) | (assoc << 4) | dtype
    return bytes((b0, b1, 0, len(value))) + value


def scsi_name(name: str) -> bytes:
    """SPC-4 7.8.6.11: UTF-8, NUL terminated, padded to a multiple of 4 bytes."""
    raw = name.encode() + b"\0"
    return raw + b"\0" * (-len(raw) % 4)


def supported_pages(lu: LogicalUnit, cmd: Command) -> bytes:
    return bytes(sorted(VPD_PAGES))


def unit_serial_number(lu: LogicalUnit, cmd: Command) -> bytes:
    """SPC-4 7.8.16."""
    return lu.identity.serial.encode("ascii")


def device_identification(lu: LogicalUnit, cmd: Command) -> bytes:
    """SPC-4 7.8.6: NAA (LU), T10 vendor id (LU), and for the port the command came in
    on (cmd.port): relative target port (7.8.6.5), target port group (7.8.6.6), SCSI names."""
    port = cmd.port
    t10 = lu.spec.vendor.encode("ascii").ljust(8) + lu.identity.serial.encode("ascii")
    return b"".join((
        designator(CODE_SET_BINARY, ASSOC_LU, TYPE_NAA, lu.identity.wwn),
        designator(CODE_SET_ASCII, ASSOC_LU, TYPE_T10, t10),
        designator(CODE_SET_BINARY, ASSOC_TARGET_PORT, TYPE_RELATIVE_TARGET_PORT,
                   struct.pack(">HH", 0, port.relative_id), piv=True),
        designator(CODE_SET_BINARY, ASSOC_TARGET_PORT, TYPE_TARGET_PORT_GROUP,
                   struct.pack(">HH", 0, port.group.id), piv=True),
        designator(CODE_SET_UTF8, ASSOC_TARGET_PORT, TYPE_SCSI_NAME,
                   scsi_name(port.name), piv=True),
        designator(CODE_SET_UTF8, ASSOC_TARGET_DEVICE, TYPE_SCSI_NAME,
                   scsi_name(cmd.target.target_port_name), piv=True),
    ))


def block_limits(lu: LogicalUnit, cmd: Command) -> bytes:
    """SBC-3 6.6.4 (page length 3Ch). A block device's own limits (device_traits.py)
    narrow the defaults; the transport's limit caps the transfer lengths."""
    bs = lu.block_size
    body = bytearray(0x3C)
    body[1] = bl.MAX_COMPARE_AND_WRITE_BLOCKS  # byte 5 of the page
    physical = lu.physical_block_size
    traits = lu.traits
    struct.pack_into(">H", body, 2, bl.blocks(max(bl.OPTIMAL_GRANULARITY_BYTES, physical), bs))
    port = cmd.req.target_port
    max_blocks = bl.max_transfer_blocks(port, bs)
    if traits is not None and traits.max_io_bytes:
        max_blocks = min(max_blocks, bl.blocks(traits.max_io_bytes, bs))
    optimal = bl.optimal_transfer_blocks(port, bs)
    if traits is not None and traits.optimal_io_size:
        optimal = bl.blocks(traits.optimal_io_size, bs)
    struct.pack_into(">I", body, 4, max_blocks)
    struct.pack_into(">I", body, 8, min(optimal, max_blocks))
    unmap_count = bl.MAX_UNMAP_LBA_COUNT
    unmap_granularity = max(bl.UNMAP_GRANULARITY_BYTES, physical)
    if traits is not None and traits.discard_max_bytes:
        unmap_count = min(unmap_count, bl.blocks(traits.discard_max_bytes, bs))
        unmap_granularity = max(unmap_granularity, traits.discard_granularity)
    struct.pack_into(">I", body, 16, unmap_count)
    struct.pack_into(">I", body, 20, bl.MAX_UNMAP_DESCRIPTORS)
    struct.pack_into(">I", body, 24, bl.blocks(unmap_granularity, bs))
    struct.pack_into(">Q", body, 32, bl.MAX_WRITE_SAME_LENGTH)
    # SBC-4 6.6.4: MAXIMUM ATOMIC TRANSFER LENGTH (WRITE ATOMIC(16)); ATOMIC ALIGNMENT,
    # ATOMIC TRANSFER LENGTH GRANULARITY 0 = no constraint; no atomic boundary.
    struct.pack_into(">I", body, 40, bl.max_transfer_blocks(port, bs))
    return bytes(body)


def block_device_characteristics(lu: LogicalUnit, cmd: Command) -> bytes:
    """SBC-3 6.6.2: MEDIUM ROTATION RATE 1 = non-rotating medium (an image file, an SSD),
    0 = not reported (a rotating disk of unknown speed). SBC-4: WABEREQ 01b (a read after
    SANITIZE BLOCK ERASE returns GOOD: zeros), WACEREQ 00b (no cryptographic erase)."""
    body = bytearray(0x3C)
    rotating = lu.traits is not None and lu.traits.rotational
    struct.pack_into(">H", body, 0, 0 if rotating else 1)
    body[3] = 0x40  # byte 7 of the page: WABEREQ (7-6) 01b
    return bytes(body)


def logical_block_provisioning(lu: LogicalUnit, cmd: Command) -> bytes:
    """SBC-3 6.6.4: LBPU, LBPWS, LBPWS10, LBPRZ; provisioning type 2 (thin)."""
    flags = 0x80 | 0x40 | 0x20 | (0x04 if lu.lbprz else 0)
    return bytes((0, flags, 0x02, 0))


def third_party_copy(lu: LogicalUnit, cmd: Command) -> bytes:
    """SPC-4 7.8.17: the copy manager's third-party copy descriptors (LID1 only):
    Supported Commands (0001h), Parameter Data (0008h), Supported Descriptors (0009h)."""
    from . import spc_xcopy as xc  # the copy manager's limits live with it

    def descriptor(dtype: int, body: bytes) -> bytes:
        body += b"\0" * (-(len(body) + 4) % 4)  # each descriptor a multiple of 4 bytes
        return struct.pack(">HH", dtype, len(body)) + body

    commands = bytes((0x83, 1, 0x00, 0x84, 2, 0x00, 0x03))  # EXTENDED COPY(LID1); RCR 00h 03h
    params = struct.pack(">HHHIIII", 0, xc.MAX_CSCD_DESCRIPTORS, xc.MAX_SEGMENT_DESCRIPTORS,
                         xc.MAX_DESCRIPTOR_LIST_LENGTH, 0, 0, 0)
    return b"".join((
        descriptor(0x0001, bytes((len(commands),)) + commands),
        descriptor(0x0008, params),
        descriptor(0x0009, bytes((len(xc.IMPLEMENTED_DESCRIPTORS),)) + xc.IMPLEMENTED_DESCRIPTORS),
    ))


VPD_PAGES: dict[int, Callable[[LogicalUnit, Command], bytes]] = {
    0x00: supported_pages,
    0x80: unit_serial_number,
    0x83: device_identification,
    0x8F: third_party_copy,
    0xB0: block_limits,
    0xB1: block_device_characteristics,
    0xB2: logical_block_provisioning,
}
