"""Property: any CDB, any LUN field, any buffer shapes -> a well-formed response, never a raise."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.scsi.command_families import COMMAND_TABLE
from bridge.scsi.logical_unit import LogicalUnitSpec
from bridge.scsi.request import (
    REPORT_LUNS_WLUN,
    InitiatorPort,
    ScsiRequest,
    ScsiResponse,
    ScsiStatus,
    ServiceResponse,
    TaskManagementFunction,
    TmfServiceResponse,
)
from bridge.scsi.target import Target

from .helpers import INI_A, INI_B, MiB, drain_ua

KNOWN_OPCODES = sorted({i.opcode for i in COMMAND_TABLE.rows()})

ROWS = COMMAND_TABLE.rows()


def _valid_bits(info, raw: list[int]) -> bytes:
    """A CDB for ``info`` with only bits its usage data allows (so it reaches the handler)."""
    body = bytes(b & m for b, m in zip(raw, info.usage, strict=False))
    body = body.ljust(info.cdb_length, b"\0")
    b1 = body[1]
    if info.service_action is not None:
        b1 = (b1 & 0xE0) | info.service_action
    return bytes((info.opcode, b1)) + body[2:]


structured = st.builds(
    _valid_bits, st.sampled_from(ROWS),
    st.lists(st.sampled_from([0, 0, 0, 0, 1, 2, 3, 8, 0x10, 0x40, 0xFF]), min_size=16,
             max_size=16))

cdbs = st.one_of(
    structured, structured, structured,
    st.binary(min_size=0, max_size=260),
    st.builds(lambda op, tail: bytes((op,)) + tail, st.sampled_from(KNOWN_OPCODES),
              st.binary(min_size=0, max_size=31)),
    # plausible-looking CDBs: known opcode, small numbers in the length fields
    st.builds(lambda op, b1, body: bytes((op, b1)) + body, st.sampled_from(KNOWN_OPCODES),
              st.integers(0, 0x1F), st.lists(st.sampled_from([0, 0, 0, 1, 2, 8, 0x10, 0xFF]),
                                             min_size=4, max_size=14).map(bytes)),
)
_shape = st.lists(st.one_of(st.integers(0, 9000), st.sampled_from([512, 4096, 8192])),
                  min_size=1, max_size=4)
# (data-in lengths, data-out lengths): mostly one direction, sometimes none or both.
buffer_shapes = st.one_of(
    st.tuples(_shape, st.just([])),
    st.tuples(st.just([]), _shape),
    st.tuples(_shape, st.just([])),
    st.tuples(st.just([]), _shape),
    st.just(([], [])),
    st.tuples(_shape, _shape),
)
_good_luns = st.sampled_from([0] * 6 + [1, 9])
luns = st.one_of(
    _good_luns, _good_luns, _good_luns,
    st.sampled_from([0] * 4 + [1, 3, 9, REPORT_LUNS_WLUN]),
    st.integers(min_value=0, max_value=2**64 - 1),
)

_tags = itertools.count(1)


@pytest.fixture(scope="module")
def hostile_target(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    t = Target(
        [LogicalUnitSpec(name="d0", path=str(d / "d0.img"), size=4 * MiB),
         LogicalUnitSpec(name="d1", path=str(d / "d1.img"), size=MiB, block_size=4096,
                         read_only=True)],
        {INI_A: {0: "d0", 1: "d1"}, INI_B: {0: "d0"}},
    )
    yield t
    t.close()


def forget_sanitize(lu) -> None:  # type: ignore[no-untyped-def]
    """Leave sanitize failure mode (SBC-3 4.11) that a random SANITIZE left behind: a
    SANITIZE with IMMED=1 runs as a system task, cancelled when its trio run (one test)
    ends, which is a failed sanitize operation for the next test."""
    if not lu.sanitize.running:
        lu.sanitize.failed = False


def well_formed(resp: ScsiResponse, in_len: int, out_len: int) -> None:
    assert isinstance(resp, ScsiResponse)
    assert resp.response in set(ServiceResponse)
    assert resp.status in set(ScsiStatus)
    assert 0 <= resp.residual <= max(in_len, out_len)
    assert isinstance(resp.sense, bytes) and len(resp.sense) <= 96
    if resp.status == ScsiStatus.CHECK_CONDITION:
        assert resp.sense[0] in (0x70, 0xF0, 0x72)
        key = resp.sense[1] if resp.sense[0] == 0x72 else resp.sense[2]
        assert key & 0xF
    else:
        assert resp.sense == b""


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cdb=cdbs, lun=luns, shapes=buffer_shapes,
       initiator=st.sampled_from([INI_A, INI_A, INI_B, "iqn.x:stranger"]))
async def test_any_request_gets_a_well_formed_response(hostile_target, cdb, lun, shapes,
                                                       initiator):
    ins, outs = shapes
    for name in ("d0", "d1"):  # an earlier STOP UNIT would hide every medium command
        hostile_target.logical_unit(name).stopped = False
        forget_sanitize(hostile_target.logical_unit(name))  # and so would a failed SANITIZE
    data_in = [memoryview(bytearray(n)) for n in ins]
    data_out = [memoryview(bytes(n)) for n in outs]
    req = ScsiRequest(lun=lun, tag=next(_tags), cdb=cdb, initiator=InitiatorPort(initiator),
                      data_in=data_in, data_out=data_out)
    resp = await hostile_target.execute(req)
    well_formed(resp, sum(ins), sum(outs))
    # TARGET_FAILURE is the last-resort answer to a bug in the core: never for guest input
    assert resp.response != ServiceResponse.TARGET_FAILURE
    if sum(ins) and sum(outs):
        assert resp.response == ServiceResponse.SERVICE_DELIVERY_FAILURE
    for name in ("d0", "d1"):
        assert len(hostile_target.logical_unit(name).tasks) == 0


async def test_handler_crash_becomes_target_failure(tmp_path, monkeypatch):
    """The last-resort handler: an unexpected exception answers TARGET_FAILURE. On a
    target of its own: the hostile one carries whatever state random commands left
    (stopped, reserved, sanitizing), which would answer first."""
    target = Target([LogicalUnitSpec(name="d0", path=str(tmp_path / "d0.img"), size=MiB)],
                    {INI_A: {0: "d0"}})
    lu = target.logical_unit("d0")

    async def boom(offset, views):
        raise RuntimeError("bug")

    monkeypatch.setattr(lu.backing, "read_into", boom)
    monkeypatch.setattr(lu.backing, "nowait_reads", False)  # no inline fast path
    req = ScsiRequest(lun=0, tag=next(_tags),
                      cdb=bytes((0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0)),
                      initiator=InitiatorPort(INI_A), data_in=[memoryview(bytearray(512))])
    await drain_ua(target)  # POWER ON OCCURRED
    resp = await target.execute(req)
    assert resp.response == ServiceResponse.TARGET_FAILURE
    assert resp.status == ScsiStatus.CHECK_CONDITION and resp.sense[2] == 0x04
    assert len(lu.tasks) == 0
    target.close()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(function=st.sampled_from(list(TaskManagementFunction)), lun=luns,
       tag=st.integers(0, 2**64 - 1), initiator=st.sampled_from([INI_A, INI_B, "iqn.x:stranger"]))
async def test_any_tmf_gets_an_answer(hostile_target, function, lun, tag, initiator):
    from bridge.scsi.request import TmfRequest

    resp = await hostile_target.task_management(
        TmfRequest(function, lun, tag, InitiatorPort(initiator)))
    assert resp.response in set(TmfServiceResponse) - {
        TmfServiceResponse.SERVICE_DELIVERY_OR_TARGET_FAILURE}
