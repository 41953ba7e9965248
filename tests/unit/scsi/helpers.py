"""Helpers for driving the target core with request objects."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from bridge.scsi.logical_unit import LogicalUnitSpec
from bridge.scsi.request import (
    InitiatorPort,
    ScsiRequest,
    ScsiResponse,
    ScsiStatus,
    ServiceResponse,
    TargetPort,
)
from bridge.scsi.target import Target

INI_A = "iqn.2026-11.org.test:a"
INI_B = "iqn.2026-11.org.test:b"
MiB = 1 << 20


def make_target(tmp_path, *, size: int = 4 * MiB, block_size: int = 512, read_only: bool = False,
                extra_luns: bool = False, physical_block_size: int | None = None) -> Target:
    specs = [LogicalUnitSpec(name="disk0", path=str(tmp_path / "disk0.img"), size=size,
                             block_size=block_size, read_only=read_only,
                             physical_block_size=physical_block_size)]
    maps = {INI_A: {0: "disk0"}, INI_B: {0: "disk0"}}
    if extra_luns:
        specs.append(LogicalUnitSpec(name="disk1", path=str(tmp_path / "disk1.img"), size=MiB))
        maps[INI_A][3] = "disk1"
    return Target(specs, maps)


@dataclass
class Result:
    resp: ScsiResponse
    data: bytes  # the data-in bytes actually transferred (buffer length - residual)

    @property
    def status(self) -> int:
        return self.resp.status

    @property
    def sense_key(self) -> int:
        s = self.resp.sense
        return (s[1] & 0xF) if s[0] & 0x7F in (0x72, 0x73) else (s[2] & 0xF)

    @property
    def asc_ascq(self) -> tuple[int, int]:
        s = self.resp.sense
        if s[0] & 0x7F in (0x72, 0x73):
            return s[2], s[3]
        return s[12], s[13]

    @property
    def field_pointer(self) -> tuple[bool, int, int | None] | None:
        """(C/D, byte, bit or None) from the sense-key specific bytes (fixed format)."""
        s = self.resp.sense
        if s[0] & 0x7F in (0x72, 0x73):
            i = 8
            while i + 1 < len(s):
                if s[i] == 0x02:
                    sks = s[i + 4 : i + 7]
                    break
                i += 2 + s[i + 1]
            else:
                return None
        else:
            sks = s[15:18]
        if not sks[0] & 0x80:
            return None
        bit = sks[0] & 7 if sks[0] & 0x08 else None
        return bool(sks[0] & 0x40), struct.unpack(">H", sks[1:3])[0], bit


async def run(target: Target, cdb: bytes, *, data_in: int = 0, data_out: bytes | None = None,
              lun: int = 0, initiator: str = INI_A, tag: int = 1,
              clear_ua: bool = True, target_port: TargetPort | None = None,
              task_attr: int = 0) -> Result:
    if clear_ua:
        await drain_ua(target, lun=lun, initiator=initiator)
    buf = bytearray(data_in)
    req = ScsiRequest(
        lun=lun,
        tag=tag, cdb=cdb, initiator=InitiatorPort(initiator),
        data_in=[memoryview(buf)] if data_in else [],
        data_out=[memoryview(data_out)] if data_out is not None else [],
        target_port=target_port, task_attr=task_attr,
    )
    resp = await target.execute(req)
    got = bytes(buf[: data_in - resp.residual]) if data_in else b""
    return Result(resp, got)


async def drain_ua(target: Target, *, lun: int = 0, initiator: str = INI_A) -> None:
    """Consume pending unit attentions (POWER ON OCCURRED at start) with REQUEST SENSE."""
    for _ in range(20):
        r = await run(target, bytes((0x03, 0, 0, 0, 252, 0)), data_in=252, lun=lun,
                      initiator=initiator, clear_ua=False)
        if r.resp.response != ServiceResponse.COMMAND_COMPLETE or not r.data or (r.data[2] & 0xF) == 0:
            return


def assert_good(r: Result) -> None:
    assert r.resp.response == ServiceResponse.COMMAND_COMPLETE, r.resp
    assert r.status == ScsiStatus.GOOD, (r.resp, r.resp.sense.hex())


def assert_check(r: Result, key: int, asc: int, ascq: int = 0) -> None:
    assert r.resp.response == ServiceResponse.COMMAND_COMPLETE, r.resp
    assert r.status == ScsiStatus.CHECK_CONDITION, r.resp
    assert (r.sense_key, *r.asc_ascq) == (key, asc, ascq), r.resp.sense.hex()


def read10(lba: int, nblocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x28, flags, lba, 0, nblocks, 0)


def write10(lba: int, nblocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, flags, lba, 0, nblocks, 0)


def read16(lba: int, nblocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x88, flags, lba, nblocks, 0, 0)


def write16(lba: int, nblocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, flags, lba, nblocks, 0, 0)
