"""ALUA (SPC-4 5.15): the state x command-class table, REPORT/SET TARGET PORT GROUPS,
the Device Identification VPD designators per port, unit attentions, port down/up."""

from __future__ import annotations

import struct

import pytest

from bridge.scsi.alua import (
    ALLOWED_IN,
    REFUSAL_SENSE,
    AccessState,
    CommandClass,
    command_class,
    parse_state,
    refusal,
)
from bridge.scsi.logical_unit import LogicalUnitSpec
from bridge.scsi.ports import GroupSpec, PortMap, PortSpec, change_states, port_down, port_up
from bridge.scsi.request import InitiatorPort, ScsiRequest, ServiceResponse, TargetPort
from bridge.scsi.sense import SenseKey
from bridge.scsi.target import Target

from .helpers import MiB, assert_check, assert_good, drain_ua, read10, run, write10

NAME = "iqn.2026-11.org.test:guest"
PATH1 = f"{NAME},i,0x000000000001"
PATH2 = f"{NAME},i,0x000000000002"
OTHER = "iqn.2026-11.org.test:other"

# One command of each class (the table's rows).
SAMPLES: dict[CommandClass, bytes] = {
    CommandClass.IDENTIFY: bytes((0x12, 0, 0, 0, 96, 0)),
    CommandClass.REPORT_TPG: bytes((0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0)),
    CommandClass.SET_TPG: bytes((0xA4, 0x0A)) + bytes(10),
    CommandClass.ECHO_BUFFER: bytes((0x3C, 0x0A, 0, 0, 0, 0, 0, 0, 4, 0)),
    CommandClass.DEVICE_REPORTS: bytes((0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0)),
    CommandClass.MODE_LOG_DIAG: bytes((0x1A, 0, 0x3F, 0, 255, 0)),
    CommandClass.RESERVATIONS: bytes((0x5E, 0, 0, 0, 0, 0, 0, 0x10, 0, 0)),
    CommandClass.OTHER: read10(0, 1),
}


def make(tmp_path, *, state2=AccessState.STANDBY) -> Target:
    spec = LogicalUnitSpec(name="disk0", path=str(tmp_path / "disk0.img"), size=4 * MiB)
    ports = PortMap(
        [GroupSpec("left", 1), GroupSpec("right", 2, state2)],
        [PortSpec(1, "left", "vm.a.sock", PATH1), PortSpec(1, "left", "other.sock", OTHER),
         PortSpec(2, "right", "vm.b.sock", PATH2)])
    return Target([spec], {PATH1: {0: "disk0"}, PATH2: {0: "disk0"}, OTHER: {0: "disk0"}},
                  ports=ports)


@pytest.fixture
def target(tmp_path):
    t = make(tmp_path)
    yield t
    t.close()


def rtpg(fmt: int = 0, alloc: int = 1024) -> bytes:
    return struct.pack(">BBIIBB", 0xA3, (fmt << 5) | 0x0A, 0, alloc, 0, 0)


def stpg(plen: int) -> bytes:
    return struct.pack(">BBIIBB", 0xA4, 0x0A, 0, plen, 0, 0)


def stpg_list(*pairs: tuple[int, int]) -> bytes:
    return bytes(4) + b"".join(struct.pack(">BBH", s, 0, g) for s, g in pairs)


# -- the table -------------------------------------------------------------------


def test_samples_cover_every_class():
    assert set(SAMPLES) == set(CommandClass) == set(ALLOWED_IN)
    for cls, cdb in SAMPLES.items():
        assert command_class(cdb) is cls


@pytest.mark.parametrize("state", list(AccessState))
@pytest.mark.parametrize("cls", list(CommandClass))
def test_every_state_times_class(state, cls):
    """SPC-4 5.15.2.4.2-5.15.2.5: each cell of the table, sense included."""
    got = refusal(state, SAMPLES[cls])
    active = state in (AccessState.ACTIVE_OPTIMIZED, AccessState.ACTIVE_NON_OPTIMIZED)
    if active or state in ALLOWED_IN[cls]:
        assert got is None
    else:
        assert got == REFUSAL_SENSE[state]
        assert got.key == SenseKey.NOT_READY and got.asc == 0x04


def test_table_cells_from_the_standard():
    S, U, T = AccessState.STANDBY, AccessState.UNAVAILABLE, AccessState.TRANSITIONING
    # Standby: TEST UNIT READY and medium access refused with 04h/0Bh, PR and MODE allowed.
    assert refusal(S, bytes(6)).ascq == 0x0B
    assert refusal(S, write10(0, 1)).ascq == 0x0B
    assert refusal(S, SAMPLES[CommandClass.RESERVATIONS]) is None
    assert refusal(S, SAMPLES[CommandClass.MODE_LOG_DIAG]) is None
    # Unavailable: PR refused (04h/0Ch), STPG allowed.
    assert refusal(U, SAMPLES[CommandClass.RESERVATIONS]).ascq == 0x0C
    assert refusal(U, SAMPLES[CommandClass.SET_TPG]) is None
    # Transitioning: STPG refused with 04h/0Ah, RTPG allowed.
    assert refusal(T, SAMPLES[CommandClass.SET_TPG]).ascq == 0x0A
    assert refusal(T, SAMPLES[CommandClass.REPORT_TPG]) is None
    # READ BUFFER in a data mode is medium-class, its echo mode is not.
    assert command_class(bytes((0x3C, 0x02)) + bytes(8)) is CommandClass.OTHER


def test_parse_state():
    assert parse_state("standby") is AccessState.STANDBY
    assert parse_state("Active/Optimized") is AccessState.ACTIVE_OPTIMIZED
    assert parse_state("an") is AccessState.ACTIVE_NON_OPTIMIZED
    with pytest.raises(ValueError, match="unknown access state"):
        parse_state("sideways")


# -- through the target ----------------------------------------------------------


async def test_standby_path_refuses_io_active_path_serves(target):
    assert_good(await run(target, write10(0, 1), data_out=bytes(512), initiator=PATH1))
    r = await run(target, read10(0, 1), data_in=512, initiator=PATH2)
    assert_check(r, SenseKey.NOT_READY, 0x04, 0x0B)
    r = await run(target, bytes(6), initiator=PATH2)  # TEST UNIT READY
    assert_check(r, SenseKey.NOT_READY, 0x04, 0x0B)
    assert_good(await run(target, bytes((0x12, 0, 0, 0, 96, 0)), data_in=96, initiator=PATH2))


async def test_request_target_port_names_the_port_of_an_unconfigured_nexus(target):
    """A configured nexus is on its own port whatever the request says; for another
    initiator port the transport's TargetPort (relative id) names the port."""
    stranger = "iqn.2026-11.org.test:stranger"
    target.map_lun(stranger, 0, "disk0")
    await drain_ua(target, initiator=stranger)
    req = ScsiRequest(lun=0, tag=9, cdb=bytes(6), initiator=InitiatorPort(stranger),
                      target_port=TargetPort("x", 2))
    resp = await target.execute(req)
    assert resp.sense[12:14] == bytes((0x04, 0x0B))
    await drain_ua(target, initiator=OTHER)
    req = ScsiRequest(lun=0, tag=9, cdb=bytes(6), initiator=InitiatorPort(OTHER),
                      target_port=TargetPort("x", 2))
    assert (await target.execute(req)).status == 0


@pytest.mark.parametrize("state,ascq", [(AccessState.UNAVAILABLE, 0x0C),
                                        (AccessState.TRANSITIONING, 0x0A),
                                        (AccessState.OFFLINE, 0x12)])
async def test_refused_states_sense(tmp_path, state, ascq):
    t = make(tmp_path, state2=state)
    try:
        r = await run(t, read10(0, 1), data_in=512, initiator=PATH2)
        assert_check(r, SenseKey.NOT_READY, 0x04, ascq)
    finally:
        t.close()


async def test_inquiry_tpgs_both(target):
    r = await run(target, bytes((0x12, 0, 0, 0, 96, 0)), data_in=96, initiator=PATH1)
    assert r.data[5] & 0x30 == 0x30


def designators(page: bytes) -> dict[int, bytes]:
    """Target-port designators (association 01b) of a page 83h, by type."""
    out, i = {}, 4
    while i + 4 <= len(page):
        assoc, dtype, n = (page[i + 1] >> 4) & 3, page[i + 1] & 0xF, page[i + 3]
        if assoc == 1:
            out[dtype] = page[i + 4 : i + 4 + n]
        i += 4 + n
    return out


@pytest.mark.parametrize("ini,rtpi,tpg", [(PATH1, 1, 1), (PATH2, 2, 2), (OTHER, 1, 1)])
async def test_device_identification_of_the_port(target, ini, rtpi, tpg):
    r = await run(target, bytes((0x12, 1, 0x83, 1, 0, 0)), data_in=256, initiator=ini)
    assert_good(r)
    d = designators(r.data)
    assert struct.unpack(">H", d[4][2:])[0] == rtpi  # relative target port (7.8.6.5)
    assert struct.unpack(">H", d[5][2:])[0] == tpg  # target port group (7.8.6.6)
    assert d[8].rstrip(b"\0").endswith(f",t,0x{rtpi:04x}".encode())


async def test_rtpg_length_only(target):
    r = await run(target, rtpg(0), data_in=1024, initiator=PATH2)
    assert_good(r)
    (n,) = struct.unpack(">I", r.data[:4])
    assert n == len(r.data) - 4 == 2 * 8 + 2 * 4  # two groups of one port each
    g1 = r.data[4:4 + 8 + 4]
    assert g1[0] & 0x0F == 0 and struct.unpack(">H", g1[2:4])[0] == 1
    assert g1[1] == 0xCF  # T_SUP O_SUP U_SUP S_SUP AN_SUP AO_SUP
    assert g1[7] == 1 and struct.unpack(">H", g1[10:12])[0] == 1
    g2 = r.data[16:16 + 12]
    assert g2[0] & 0x0F == 2 and struct.unpack(">H", g2[2:4])[0] == 2
    assert struct.unpack(">H", g2[10:12])[0] == 2


async def test_rtpg_extended_header(target):
    r = await run(target, rtpg(1), data_in=1024, initiator=PATH1)
    assert_good(r)
    (n,) = struct.unpack(">I", r.data[:4])
    assert n == len(r.data) - 4
    assert r.data[4] == 0x10  # FORMAT TYPE 001b
    assert r.data[5] == target.ports.implicit_transition_time
    assert struct.unpack(">H", r.data[10:12])[0] == 1  # first group's id


async def test_rtpg_bad_format_and_truncation(target):
    assert_check(await run(target, rtpg(2), data_in=64, initiator=PATH1),
                 SenseKey.ILLEGAL_REQUEST, 0x24)
    r = await run(target, rtpg(0, alloc=4), data_in=64, initiator=PATH1)
    assert_good(r)
    assert len(r.data) == 4


async def test_stpg_sets_states_and_ua_to_other_nexuses(target):
    for ini in (PATH1, PATH2, OTHER):
        await drain_ua(target, initiator=ini)
    plist = stpg_list((0, 2), (2, 1))  # right -> A/O, left -> standby
    assert_good(await run(target, stpg(len(plist)), data_out=plist, initiator=PATH2))
    assert target.ports.group("right").state is AccessState.ACTIVE_OPTIMIZED
    assert target.ports.group("left").state is AccessState.STANDBY
    assert target.ports.group("left").status == 1  # altered by SET TARGET PORT GROUPS
    # ASYMMETRIC ACCESS STATE CHANGED to every other I_T nexus, not the sender.
    for ini in (PATH1, OTHER):
        r = await run(target, bytes(6), initiator=ini, clear_ua=False)
        assert_check(r, SenseKey.UNIT_ATTENTION, 0x2A, 0x06)
    assert_good(await run(target, read10(0, 1), data_in=512, initiator=PATH2, clear_ua=False))
    r = await run(target, read10(0, 1), data_in=512, initiator=PATH1, clear_ua=False)
    assert_check(r, SenseKey.NOT_READY, 0x04, 0x0B)


@pytest.mark.parametrize("plist,byte", [
    (stpg_list((0xE, 1)), 4),  # offline cannot be requested
    (stpg_list((0xF, 1)), 4),  # nor transitioning
    (stpg_list((0, 9)), 6),  # no such group
    (stpg_list((0, 1), (1, 1)), 10),  # a group twice
])
async def test_stpg_invalid_parameter_list(target, plist, byte):
    r = await run(target, stpg(len(plist)), data_out=plist, initiator=PATH1)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x26)
    assert r.field_pointer[1] == byte
    assert target.ports.group("left").state is AccessState.ACTIVE_OPTIMIZED


async def test_stpg_length_error(target):
    r = await run(target, stpg(6), data_out=bytes(6), initiator=PATH1)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x1A)


async def test_stpg_refused_while_transitioning(tmp_path):
    t = make(tmp_path, state2=AccessState.TRANSITIONING)
    try:
        plist = stpg_list((0, 2))
        r = await run(t, stpg(len(plist)), data_out=plist, initiator=PATH2)
        assert_check(r, SenseKey.NOT_READY, 0x04, 0x0A)
    finally:
        t.close()


async def test_implicit_change_ua_to_every_nexus(target):
    for ini in (PATH1, PATH2, OTHER):
        await drain_ua(target, initiator=ini)
    change_states(target, {target.ports.group("right"): AccessState.ACTIVE_NON_OPTIMIZED})
    assert target.ports.group("right").status == 2  # implicit
    for ini in (PATH1, PATH2, OTHER):
        r = await run(target, bytes(6), initiator=ini, clear_ua=False)
        assert_check(r, SenseKey.UNIT_ATTENTION, 0x2A, 0x06)
    # No change, no UA.
    change_states(target, {target.ports.group("right"): AccessState.ACTIVE_NON_OPTIMIZED})
    assert_good(await run(target, bytes(6), initiator=PATH1, clear_ua=False))


async def test_rsoc_lists_the_new_commands(target):
    cdb = struct.pack(">BBBBHIBB", 0xA3, 0x0C, 0x02, 0xA3, 0x0A, 64, 0, 0)
    r = await run(target, cdb, data_in=64, initiator=PATH1)
    assert_good(r)
    assert r.data[1] & 0x07 == 0x03  # supported
    cdb = struct.pack(">BBBBHIBB", 0xA3, 0x0C, 0x02, 0xA4, 0x0A, 64, 0, 0)
    r = await run(target, cdb, data_in=64, initiator=PATH1)
    assert r.data[1] & 0x07 == 0x03


async def test_port_down_and_up(target):
    await drain_ua(target, initiator=PATH1)
    port = target.ports.port(1)
    port_down(target, port)
    r = await run(target, bytes(6), initiator=PATH1, clear_ua=False)
    assert r.resp.response is ServiceResponse.PORT_DOWN
    r = await run(target, bytes(6), initiator=OTHER, clear_ua=False)
    assert r.resp.response is ServiceResponse.PORT_DOWN
    # The other port still answers.
    r = await run(target, bytes((0x12, 0, 0, 0, 96, 0)), data_in=96, initiator=PATH2)
    assert_good(r)
    port_up(port)
    # The nexus was lost: I_T NEXUS LOSS OCCURRED, then normal service.
    r = await run(target, bytes(6), initiator=PATH1, clear_ua=False)
    assert_check(r, SenseKey.UNIT_ATTENTION, 0x29, 0x07)
    assert_good(await run(target, bytes(6), initiator=PATH1, clear_ua=False))


def test_portmap_lookups_and_errors():
    pm = PortMap([GroupSpec("g", 1)], [PortSpec(1, "g", "a.sock", PATH1),
                                        PortSpec(2, "g", "b.sock", PATH2)])
    assert pm.port("b.sock").relative_id == 2
    assert pm.group("1").name == "g" and pm.group(1).name == "g"
    assert pm.siblings(PATH2) == [PATH2, PATH1]
    assert pm.resolve(NAME, 2) == PATH2
    assert pm.resolve(PATH1, 1) == PATH1
    assert pm.resolve(PATH1, 2) is None
    with pytest.raises(KeyError):
        pm.group("nope")
    with pytest.raises(ValueError, match="two target ports"):
        PortMap([GroupSpec("g", 1)], [PortSpec(1, "g", "a", PATH1), PortSpec(2, "g", "b", PATH1)])
    with pytest.raises(ValueError, match="no port group"):
        PortMap([GroupSpec("g", 1)], [PortSpec(1, "h", "a", PATH1)])
