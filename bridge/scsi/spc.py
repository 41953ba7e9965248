"""SPC-4 primary commands: TEST UNIT READY, INQUIRY (+VPD), REQUEST SENSE, REPORT LUNS."""

from __future__ import annotations

import struct

from bridge.scsi.request import REPORT_LUNS_WLUN

from .cdb import lu_not_supported, u16, u32
from .command import Command, CommandRows
from .sense import SenseData, SenseKey, invalid_field_in_cdb
from .unit_attention import REPORTED_LUNS_DATA_HAS_CHANGED
from .vpd import VPD_PAGES

ROWS = CommandRows()

PDT_DIRECT_ACCESS = 0x00
PDT_WELL_KNOWN_LU = 0x1E
PDT_UNKNOWN = 0x1F
PQ_NOT_CAPABLE = 0x60  # peripheral qualifier 011b: no LU at this LUN (SPC-4 6.6.2)

# SPC-4 6.6.2 version descriptors: SAM-5, SPC-4, SBC-3 (no version claimed).
VERSION_DESCRIPTORS = (0x00A0, 0x0460, 0x04C0)
REVISION = b"0001"


@ROWS.command(0x00, None, "TEST UNIT READY", "00 00 00 00 00 00", allowed_without_lu=True,
         medium=True)
async def test_unit_ready(cmd: Command) -> None:
    """SPC-4 6.37: GOOD, or NOT READY while stopped by START STOP UNIT (checked in dispatch)."""
    if cmd.lu is None and cmd.lun != REPORT_LUNS_WLUN:
        raise lu_not_supported()


def standard_inquiry(cmd: Command) -> bytes:
    """SPC-4 6.6.2 standard INQUIRY data, 96 bytes."""
    lu = cmd.lu
    if lu is None:
        pdt = PDT_WELL_KNOWN_LU if cmd.lun == REPORT_LUNS_WLUN else PQ_NOT_CAPABLE | PDT_UNKNOWN
        vendor, product = "VSCSIBRG", "vscsi-bridge"
    else:
        pdt = PDT_DIRECT_ACCESS
        vendor, product = lu.spec.vendor, lu.spec.product
    data = bytearray(96)
    data[0] = pdt
    data[2] = 0x06  # VERSION: SPC-4
    data[3] = 0x12  # HISUP=1, RESPONSE DATA FORMAT=2
    data[4] = len(data) - 5
    if lu is not None:
        data[5] = 0x30  # TPGS 11b: implicit and explicit ALUA (SPC-4 6.6.2, 5.15)
    data[7] = 0x02  # CMDQUE
    data[8:16] = vendor.encode("ascii").ljust(8)
    data[16:32] = product.encode("ascii").ljust(16)
    data[32:36] = REVISION
    for i, v in enumerate(VERSION_DESCRIPTORS):
        struct.pack_into(">H", data, 58 + 2 * i, v)
    return bytes(data)


@ROWS.command(0x12, None, "INQUIRY", "12 01 ff ff ff 00", allowed_with_ua=True, allowed_without_lu=True)
async def inquiry(cmd: Command) -> None:
    """SPC-4 6.6. EVPD=0 with a page code is invalid; unknown VPD pages are invalid."""
    cdb = cmd.cdb
    alloc = u16(cdb, 3)
    if not cdb[1] & 0x01:
        if cdb[2]:
            raise invalid_field_in_cdb(2)
        cmd.send(standard_inquiry(cmd), alloc)
        return
    page = cdb[2]
    build = VPD_PAGES.get(page)
    if build is None:
        raise invalid_field_in_cdb(2)
    if cmd.lu is None:
        if page != 0x00:
            raise invalid_field_in_cdb(2)
        pdt = PDT_WELL_KNOWN_LU if cmd.lun == REPORT_LUNS_WLUN else PQ_NOT_CAPABLE | PDT_UNKNOWN
        cmd.send(bytes((pdt, 0x00, 0x00, 0x01, 0x00)), alloc)
        return
    body = build(cmd.lu, cmd)
    cmd.send(bytes((PDT_DIRECT_ACCESS, page)) + struct.pack(">H", len(body)) + body, alloc)


@ROWS.command(0x03, None, "REQUEST SENSE", "03 01 00 00 ff 00", allowed_with_ua=True,
         allowed_without_lu=True)
async def request_sense(cmd: Command) -> None:
    """SPC-4 6.39: report (and clear) a pending unit attention, else NO SENSE.

    On an unmapped LUN the sense data say LOGICAL UNIT NOT SUPPORTED, with GOOD status.
    """
    desc = bool(cmd.cdb[1] & 0x01)
    if cmd.lu is None:
        if cmd.lun == REPORT_LUNS_WLUN:
            sense = SenseData(SenseKey.NO_SENSE, 0, 0)
        else:
            sense = lu_not_supported().sense
    else:
        # SPC-4 6.39 / SBC-3 4.11: a pending unit attention, else the LU's state (a
        # sanitize operation's progress or failure), else NO SENSE.
        sense = (cmd.target.unit_attentions.pop(cmd.initiator, cmd.lu.name)
                 or cmd.lu.sanitize.blocking_sense() or SenseData(SenseKey.NO_SENSE, 0, 0))
    cmd.send(sense.encode(descriptor=desc), cmd.cdb[4])


def encode_lun(lun: int) -> bytes:
    """SAM-5 4.7: single-level LUN, peripheral device addressing below 256, flat above."""
    if lun == REPORT_LUNS_WLUN:
        return bytes((0xC1, 0x01)) + bytes(6)
    if lun < 256:
        return bytes((0x00, lun)) + bytes(6)
    return bytes((0x40 | (lun >> 8), lun & 0xFF)) + bytes(6)


@ROWS.command(0xA0, None, "REPORT LUNS", "a0 00 ff 00 00 00 ff ff ff ff 00 00",
         allowed_with_ua=True, allowed_without_lu=True)
async def report_luns(cmd: Command) -> None:
    """SPC-4 6.33. SELECT REPORT 0: LUs; 1: well-known LUs; 2: both."""
    cdb = cmd.cdb
    select = cdb[2]
    alloc = u32(cdb, 6)
    if select not in (0, 1, 2):
        raise invalid_field_in_cdb(2)
    if alloc < 16:
        raise invalid_field_in_cdb(6)
    luns: list[int] = []
    if select in (0, 2):
        luns.extend(cmd.target.luns_for(cmd.initiator))
    if select in (1, 2):
        luns.append(REPORT_LUNS_WLUN)
    body = b"".join(encode_lun(n) for n in luns)
    cmd.send(struct.pack(">II", len(body), 0) + body, alloc)
    # SPC-4 6.33: clears REPORTED LUNS DATA HAS CHANGED on every LU of this I_T nexus.
    cmd.target.clear_ua_for_initiator(cmd.initiator, REPORTED_LUNS_DATA_HAS_CHANGED)
