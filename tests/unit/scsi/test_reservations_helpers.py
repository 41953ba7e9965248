"""Shared helpers for the persistent reservation tests (no tests here)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest
import trio

from bridge.scsi.request import (
    InitiatorPort,
)
from bridge.scsi.reservations import (
    PersistentReservations,
    ReservationConflict,
    pr_in_cdb,
    pr_out_cdb,
)
from bridge.scsi.reservations.codec import encode_iscsi_transport_id
from bridge.scsi.sense import SenseError

A = InitiatorPort("iqn.2026-11.org.test:node-a")
B = InitiatorPort("iqn.2026-11.org.test:node-b")
C = InitiatorPort("iqn.2026-11.org.test:node-c")
D = InitiatorPort("iqn.2026-11.org.test:node-d")

KEY_A, KEY_B, KEY_C, KEY_D = 0xA1A1, 0xB2B2, 0xC3C3, 0xD4D4

# PR OUT service actions
(
    REGISTER,
    RESERVE,
    RELEASE,
    CLEAR,
    PREEMPT,
    PREEMPT_AND_ABORT,
    REGISTER_IGNORE,
    REGISTER_AND_MOVE,
) = range(8)
# PR IN service actions
READ_KEYS, READ_RESERVATION, REPORT_CAPABILITIES, READ_FULL_STATUS = range(4)


@dataclass
class Harness:
    pr: PersistentReservations
    uas: list[tuple[str, int, int]] = field(default_factory=list)

    def take_uas(self) -> list[tuple[str, int, int]]:
        out, self.uas = self.uas, []
        return out

    # --- PR OUT -------------------------------------------------------
    def out(
        self,
        ini: InitiatorPort,
        sa: int,
        rkey: int = 0,
        sakey: int = 0,
        rtype: int = 0,
        *,
        scope: int = 0,
        spec_i_pt: bool = False,
        all_tg_pt: bool = False,
        aptpl: bool = False,
        tids: tuple[str, ...] = (),
    ) -> list[str]:
        data = params(rkey, sakey, spec_i_pt=spec_i_pt, all_tg_pt=all_tg_pt, aptpl=aptpl, tids=tids)
        _, aborts = self.handle(ini, pr_out_cdb(sa, rtype, len(data), scope), data, 0)
        return aborts

    def handle(self, ini: InitiatorPort, cdb: bytes, data_out: bytes | list[memoryview],
               alloc: int) -> tuple[bytes, list[str]]:
        """PersistentReservations.handle run to completion from synchronous test code."""
        return trio.run(self.pr.handle, ini, cdb, data_out, alloc)

    def register(self, ini: InitiatorPort, key: int, **kw: bool) -> None:
        self.out(ini, REGISTER, 0, key, **kw)

    def reserve(self, ini: InitiatorPort, key: int, rtype: int) -> None:
        self.out(ini, RESERVE, key, 0, rtype)

    # --- PR IN --------------------------------------------------------
    def pr_in(self, sa: int, alloc: int = 0xFFFF, ini: InitiatorPort = A) -> bytes:
        data, aborts = self.handle(ini, pr_in_cdb(sa, alloc), b"", alloc)
        assert aborts == []
        return data

    def keys(self) -> tuple[int, list[int]]:
        data = self.pr_in(READ_KEYS)
        gen, n = struct.unpack_from(">II", data)
        return gen, [struct.unpack_from(">Q", data, 8 + 8 * i)[0] for i in range(n // 8)]

    def reservation(self) -> tuple[int, int, int] | None:
        """(key, scope, type) from READ RESERVATION, or None."""
        data = self.pr_in(READ_RESERVATION)
        _, n = struct.unpack_from(">II", data)
        if n == 0:
            return None
        assert n == 16
        key = struct.unpack_from(">Q", data, 8)[0]
        return key, data[21] >> 4, data[21] & 0xF

    def generation(self) -> int:
        return self.keys()[0]


def make(state_path: str | None = None, lu_name: str = "disk0") -> Harness:
    h = Harness(pr=None)  # type: ignore[arg-type]
    h.pr = PersistentReservations(
        lu_name, state_path, lambda i, asc, ascq: h.uas.append((i, asc, ascq))
    )
    return h


def params(
    rkey: int,
    sakey: int,
    *,
    spec_i_pt: bool = False,
    all_tg_pt: bool = False,
    aptpl: bool = False,
    tids: tuple[str, ...] = (),
) -> bytes:
    """SPC-4 6.16.3 basic parameter list (+ TransportIDs when SPEC_I_PT)."""
    flags = (0x08 if spec_i_pt else 0) | (0x04 if all_tg_pt else 0) | (0x01 if aptpl else 0)
    data = struct.pack(">QQIBBH", rkey, sakey, 0, flags, 0, 0)
    if spec_i_pt:
        blob = b"".join(encode_iscsi_transport_id(t) for t in tids)
        data += struct.pack(">I", len(blob)) + blob
    return data


def ram_params(
    rkey: int,
    sakey: int,
    dest: str | bytes,
    *,
    unreg: bool = False,
    aptpl: bool = False,
    rtpi: int = 1,
) -> bytes:
    """SPC-4 6.16.4 REGISTER AND MOVE parameter list."""
    tid = encode_iscsi_transport_id(dest) if isinstance(dest, str) else dest
    flags = (0x02 if unreg else 0) | (0x01 if aptpl else 0)
    return struct.pack(">QQBBHI", rkey, sakey, 0, flags, rtpi, len(tid)) + tid


def expect_sense(excinfo: pytest.ExceptionInfo[SenseError], key: int, asc: int, ascq: int) -> None:
    s = excinfo.value.sense
    assert (int(s.key), s.asc, s.ascq) == (key, asc, ascq)


def field_pointer(excinfo: pytest.ExceptionInfo[SenseError]) -> tuple[bool, int, int | None]:
    fp = excinfo.value.sense.field_pointer
    assert fp is not None
    return fp.in_cdb, fp.byte, fp.bit


__all__ = ["ReservationConflict", "SenseError"]
