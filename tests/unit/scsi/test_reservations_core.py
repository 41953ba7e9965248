"""A fence_scsi-style scenario through the real target core (dispatch, UAs, task set)."""

from __future__ import annotations

import struct

from bridge.scsi.logical_unit import LogicalUnitSpec
from bridge.scsi.request import (
    ScsiStatus,
)
from bridge.scsi.target import Target

from .helpers import assert_check, assert_good, read10, run, write10

N1 = "iqn.2026-11.org.test:node1"
N2 = "iqn.2026-11.org.test:node2"
N3 = "iqn.2026-11.org.test:node3"
K1, K2, K3 = 0x1111, 0x2222, 0x3333
WERO = 5


def make_target(tmp_path) -> Target:
    spec = LogicalUnitSpec(
        name="shared", path=str(tmp_path / "shared.img"), size=1 << 20, block_size=512
    )
    return Target([spec], {N1: {0: "shared"}, N2: {0: "shared"}, N3: {0: "shared"}})


def pr_out(sa: int, rkey: int = 0, sakey: int = 0, rtype: int = 0, aptpl: bool = False):
    params = struct.pack(">QQIBBH", rkey, sakey, 0, 1 if aptpl else 0, 0, 0)
    return struct.pack(">BBB2xIB", 0x5F, sa, rtype, len(params), 0), params


async def prout(t, ini, *args, **kw):
    cdb, params = pr_out(*args, **kw)
    return await run(t, cdb, data_out=params, initiator=ini, clear_ua=False)


async def read_keys(t, ini):
    r = await run(t, struct.pack(">BB5xHB", 0x5E, 0, 256, 0), data_in=256, initiator=ini)
    assert_good(r)
    gen, n = struct.unpack_from(">II", r.data)
    return gen, [struct.unpack_from(">Q", r.data, 8 + 8 * i)[0] for i in range(n // 8)]


async def test_fence_scsi_scenario_and_restart(tmp_path):
    t = make_target(tmp_path)
    sector = b"\xab" * 512
    for ini in (N1, N2, N3):
        await run(t, bytes(6), initiator=ini)  # TUR: consume POWER ON UA (sg_turs)
        assert_good(await prout(t, ini, 6, 0, {N1: K1, N2: K2, N3: K3}[ini], aptpl=True))
    assert (await read_keys(t, N1))[1] == [K1, K2, K3]
    assert_good(await prout(t, N1, 1, K1, 0, WERO))  # RESERVE WERO
    for ini in (N1, N2, N3):
        assert_good(await run(t, write10(0, 1), data_out=sector, initiator=ini))

    # node2 fences node3.
    assert_good(await prout(t, N2, 5, K2, K3, WERO))
    # node3 is told first: UNIT ATTENTION, REGISTRATIONS PREEMPTED (2Ah/05h).
    r = await run(t, write10(0, 1), data_out=sector, initiator=N3, clear_ua=False)
    assert_check(r, 0x6, 0x2A, 0x05)
    assert_good(await run(t, read10(0, 1), data_in=512, initiator=N3))  # reads stay allowed
    r = await run(t, write10(0, 1), data_out=sector, initiator=N3)
    assert r.status == ScsiStatus.RESERVATION_CONFLICT
    assert_good(await run(t, write10(0, 1), data_out=sector, initiator=N2))
    # A PR OUT from the fenced node with its old key conflicts.
    r = await prout(t, N3, 1, K3, 0, WERO)
    assert r.status == ScsiStatus.RESERVATION_CONFLICT and r.resp.sense == b""
    # Bad service action: CHECK CONDITION, INVALID FIELD IN CDB.
    cdb, params = pr_out(0x1F, K1)
    assert_check(await run(t, cdb, data_out=params, initiator=N1), 0x5, 0x24, 0)

    # Restart: APTPL brings the registrations and the reservation back.
    t.close()
    t2 = make_target(tmp_path)
    await run(t2, bytes(6), initiator=N3)
    assert (await read_keys(t2, N1))[1] == [K1, K2]
    r = await run(t2, write10(0, 1), data_out=sector, initiator=N3)
    assert r.status == ScsiStatus.RESERVATION_CONFLICT
    assert_good(await run(t2, write10(0, 1), data_out=sector, initiator=N1))
