"""fault.add/remove/list/clear in process (methods.call on a real Target), and the CLI's
argument handling for ``vscsi-bridge fault``."""

from __future__ import annotations

import argparse
import struct

import pytest
import trio
import trio.testing

from bridge.control import cli
from bridge.control import jsonrpc as j
from bridge.control.methods import call
from bridge.scsi.request import (
    InitiatorPort,
    ScsiRequest,
    ScsiStatus,
    ServiceResponse,
    TaskManagementFunction,
    TmfRequest,
)

from .test_methods import refused

VM1 = "iqn.2026-11.org.vscsi-bridge:vfio-user.vm1"


def read10(lba: int, n: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, n, 0)


async def execute(ctl, cdb: bytes, tag: int = 1, nblocks: int = 1):
    req = ScsiRequest(lun=0, tag=tag, cdb=cdb, initiator=InitiatorPort(VM1),
                      data_in=[memoryview(bytearray(512 * nblocks))])
    return await ctl.target.execute(req)


async def clear_ua(ctl) -> None:
    for _ in range(3):
        await execute(ctl, bytes(6))


async def test_add_list_status_remove_clear(ctl):
    await clear_ua(ctl)
    r = await call(ctl, "fault.add", {"lu": "disk0", "action": "medium_error", "op": "read",
                                      "lba_first": 100, "lba_last": 107, "initiator": "vm1.sock"})
    assert r == {"id": 1, "lu": "disk0", "action": "medium_error", "initiator": VM1, "op": "read",
                 "lba_first": 100, "lba_last": 107, "matched": 0, "hits": 0, "hung": 0,
                 "spent": False}
    resp = await execute(ctl, read10(104, 1))
    assert resp.status == ScsiStatus.CHECK_CONDITION and resp.sense[2] == 3
    assert struct.unpack_from(">I", resp.sense, 3)[0] == 104 and resp.sense[0] & 0x80
    b = await call(ctl, "fault.add", {"lu": "disk0", "action": "busy", "count": 1})
    [first, second] = await call(ctl, "fault.list", {})
    assert (first["hits"], second["id"]) == (1, 2)
    st = await call(ctl, "status", {})
    assert [f["id"] for f in st["faults"]] == [1, 2]
    assert (await execute(ctl, read10(0, 1))).status == ScsiStatus.BUSY
    assert (await call(ctl, "fault.remove", {"id": b["id"]}))["hits"] == 1
    await refused(ctl, "fault.remove", {"id": b["id"]}, j.NOT_FOUND, "no fault rule 2")
    assert len((await call(ctl, "fault.clear", {}))["removed"]) == 1
    assert await call(ctl, "fault.list", {}) == [] and ctl.target.faults is None


@pytest.mark.parametrize(("params", "code", "words"), [
    ({"lu": "nope", "action": "busy"}, j.NOT_FOUND, "no logical unit named 'nope'"),
    ({"lu": "disk0", "action": "explode"}, j.INVALID_PARAMS, "action: must be one of medium_error"),
    ({"lu": "disk0", "action": "delay"}, j.INVALID_PARAMS, "delay_ms: delay needs"),
    ({"lu": "disk0", "action": "busy", "op": "trim"}, j.INVALID_PARAMS, "op: must be one of"),
    ({"lu": "disk0", "action": "hang", "lba_first": 3}, j.INVALID_PARAMS, "lba_first: give both"),
    ({"lu": "disk0", "action": "busy", "every": 0}, j.INVALID_PARAMS, "every: must be"),
    ({"lu": "disk0", "action": "check_condition", "sense_key": 3}, j.INVALID_PARAMS, "asc"),
    ({"lu": "disk0", "action": "busy", "count": "2"}, j.INVALID_PARAMS, "count: must be an integer"),
])
async def test_add_errors_name_the_field(ctl, params, code, words):
    await refused(ctl, "fault.add", params, code, words)
    assert await call(ctl, "fault.list", {}) == []


async def test_hung_command_shows_in_status_and_lu_remove_forgets_rules(ctl, nursery):
    await clear_ua(ctl)
    await call(ctl, "fault.add", {"lu": "disk0", "action": "hang", "abort_fails": True})
    done = []

    async def one():
        done.append(await execute(ctl, read10(0, 1), tag=0x44))
    nursery.start_soon(one)
    await trio.testing.wait_all_tasks_blocked()
    st = await call(ctl, "status", {})
    assert st["faults"][0]["hung"] == 1
    assert [lu["tasks_in_flight"] for lu in st["logical_units"] if lu["name"] == "disk0"] == [1]
    tmf = await ctl.target.task_management(TmfRequest(TaskManagementFunction.ABORT_TASK, 0, 0x44,
                                                      InitiatorPort(VM1)))
    assert tmf.response.name == "FUNCTION_REJECTED"
    await call(ctl, "lu.remove", {"name": "disk0", "force": True})
    assert done and done[0].response is ServiceResponse.TASK_ABORTED
    assert await call(ctl, "fault.list", {}) == []
    stats = await call(ctl, "stats", {})
    assert stats["initiators"][VM1]["task_management"] == {"ABORT_TASK": {"FUNCTION_REJECTED": 1}}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    return parser.parse_args(list(argv))


def test_cli_fault_add_arguments():
    args = parse("fault", "add", "disk0", "medium_error", "--op", "read", "--lba", "100-0x70",
                 "--initiator", "vm1.sock", "--count", "3")
    method, params, _ = args.control_command(args)
    assert method == "fault.add"
    assert params == {"lu": "disk0", "action": "medium_error", "op": "read", "lba_first": 100,
                      "lba_last": 0x70, "initiator": "vm1.sock", "count": 3}
    args = parse("fault", "add", "disk0", "check_condition", "--sense", "4/3e/1", "--lba", "9")
    assert args.control_command(args)[1] == {"lu": "disk0", "action": "check_condition",
                                             "sense_key": 4, "asc": 0x3E, "ascq": 1,
                                             "lba_first": 9, "lba_last": 9}
    args = parse("fault", "add", "disk0", "hang", "--abort-fails", "--op", "read")
    assert args.control_command(args)[1]["abort_fails"] is True
    for bad in (["--sense", "3"], ["--sense", "x/y"], ["--lba", "ten"]):
        args = parse("fault", "add", "disk0", "check_condition", *bad)
        with pytest.raises(cli.UsageError):
            args.control_command(args)
    args = parse("fault", "remove", "4")
    assert args.control_command(args)[:2] == ("fault.remove", {"id": 4})


def test_cli_fault_table():
    rows = [{"id": 1, "lu": "disk0", "action": "medium_error", "op": "read", "lba_first": 8,
             "lba_last": 15, "matched": 3, "hits": 3, "hung": 0, "spent": False},
            {"id": 2, "lu": "disk0", "action": "hang", "abort_fails": True, "matched": 1,
             "hits": 1, "hung": 1, "spent": False}]
    text = cli._fmt_faults(rows)
    assert "medium_error" in text and "read, LBA 8-15" in text and "hang (abort fails)" in text
    assert cli._fmt_faults([]) == "no fault rules"
