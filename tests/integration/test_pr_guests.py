"""Booted fence_scsi scenario: three QEMU guests share one LU through one bridge.

One in-process Target holds ONE logical unit; three VirtioScsiPciDevice instances
(three I_T nexuses, each with its own iSCSI initiator port name) are served on
three vfio-user sockets, and three Linux guests (QEMU 11 vfio-user-pci, TCG) run
sg_persist / dd / sg_raw against the shared disk, step by step as fence_scsi and
Pacemaker do it (SPC-4 5.13):

1. every node registers (REGISTER AND IGNORE EXISTING KEY, its own key);
2. node A reserves Write Exclusive - Registrants Only (type 5);
3. node A fences node C with PREEMPT AND ABORT (C's key removed);
4. C sees UNIT ATTENTION REGISTRATIONS PREEMPTED (2Ah/05h) on its nexus, its writes
   end in RESERVATION CONFLICT (dd fails, sg_raw shows the status, nothing reaches
   the image), its reads still work; A's and B's writes succeed;
5. READ FULL STATUS shows every registrant's iSCSI TransportID name;
6. A sets APTPL; the bridge is stopped (guests powered off), ``vscsi-bridge status``
   shows the initiator names and the saved reservation, a new Target is
   built on the same image and sockets, fresh guests boot and find the
   reservation, the keys and the fence (C's writes still conflict).

Every step is asserted from the guests' own output (and the image on the host).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from bridge.scsi.logical_unit import LogicalUnitSpec
from bridge.scsi.request import InitiatorPort
from bridge.scsi.target import Target
from bridge.vfio_user.server import serve
from bridge.virtio.scsi_device import VirtioScsiPciDevice
from harness.guest import (
    REPO,
    GuestSession,
    guest_session,
    run_ok,
    run_shown,
)

NODES = {
    "a": ("iqn.2026-11.org.vscsi-bridge:node-a", 0xAAA1),
    "b": ("iqn.2026-11.org.vscsi-bridge:node-b", 0xBBB2),
    "c": ("iqn.2026-11.org.vscsi-bridge:node-c", 0xCCC3),
}
DISK_SIZE = 16 << 20
BLOCK_A = 100  # 4 KiB blocks: A writes here, C reads it back
BLOCK_C = 101  # C's fenced write must never land here
BLOCK_C_BEFORE = 102  # C writes here while still registered
BLOCK_B = 103
WERO = 5  # SPC-4 table 212: Write Exclusive - Registrants Only
GUEST_MEM = "256M"


@asynccontextmanager
async def bridge(run_dir: Path, nodes: list[str]) -> AsyncIterator[Target]:
    """One Target with one LU ``lu0`` seen as LUN 0 by every node; one vfio-user socket each."""
    image = run_dir / "lu0.img"
    target = Target([LogicalUnitSpec(name="lu0", path=str(image), size=DISK_SIZE, serial="PRSHARED")],
                    {NODES[n][0]: {0: "lu0"} for n in NODES})
    try:
        async with trio.open_nursery() as nursery:
            for n in nodes:
                device = VirtioScsiPciDevice(target, InitiatorPort(NODES[n][0]), num_queues=1)
                await nursery.start(serve, str(run_dir / f"{n}.sock"), device)
            yield target
            nursery.cancel_scope.cancel()
    finally:
        target.close()


@asynccontextmanager
async def guests(run_dir: Path, nodes: list[str]) -> AsyncIterator[dict[str, GuestSession]]:
    """Boot one guest per node concurrently (smp=1, small RAM); power them all off at the end."""
    sessions: dict[str, GuestSession] = {}
    stop = trio.Event()

    async def hold(n: str, *, task_status: trio.TaskStatus[GuestSession]) -> None:
        async with guest_session(attach="vfio-user", socket=run_dir / f"{n}.sock", smp=1,
                                 mem=GUEST_MEM, boot_timeout=240) as g:
            task_status.started(g)
            await stop.wait()

    async with trio.open_nursery() as holders:
        async with trio.open_nursery() as booting:
            for n in nodes:
                async def boot(n: str = n) -> None:
                    sessions[n] = await holders.start(hold, n)
                booting.start_soon(boot)
        try:
            yield sessions
        finally:
            stop.set()


# the guest's commands, printed with their output and exit status
run = partial(run_shown, timeout=90)
ok = partial(run_ok, timeout=90)


def keys_in(out: str) -> list[int]:
    """Keys listed by ``sg_persist -n -k``."""
    assert "registered reservation key" in out or "there are NO registered" in out, out
    return [int(k, 16) for k in re.findall(r"^\s+(0x[0-9a-f]+)\s*$", out, re.MULTILINE)]


def write_block(block: int, tag: str) -> str:
    """Shell: write one 4 KiB block of ``tag`` lines with O_DIRECT; prints WRITE-RC=<rc>."""
    return (f"printf '{tag}-%026d\\n' $(seq 1 128) | head -c 4096 >/tmp/{tag}.blk; "
            f"dd if=/tmp/{tag}.blk of=/dev/sda bs=4096 count=1 seek={block} oflag=direct 2>&1; "
            "echo WRITE-RC=$?")


def read_block(block: int) -> str:
    return f"dd if=/dev/sda bs=4096 count=1 skip={block} iflag=direct 2>/dev/null | head -c 37"


async def status_of(run_dir: Path) -> dict:
    """Run ``vscsi-bridge status`` (bridge/cli.py) on a TOML file for this bridge; its JSON."""
    config = run_dir / "bridge.toml"
    config.write_text(f'[bridge]\nstate_dir = "{run_dir}"\n'
                      f'[[lu]]\nname = "lu0"\npath = "{run_dir / "lu0.img"}"\n'
                      + "".join(f'[[vfio_user]]\nsocket = "{n}.sock"\ninitiator = "{NODES[n][0]}"\n'
                                f'luns = {{ 0 = "lu0" }}\n' for n in NODES))
    proc = await trio.run_process([sys.executable, "-m", "bridge.cli", "status", "--config", str(config)],
                                  capture_stdout=True, capture_stderr=True, cwd=REPO)
    return json.loads(proc.stdout)


PROUT = "sg_persist -n --out"
WAIT = "vscsi_wait_disks 1 60 && [ -c /dev/sg0 ]"


@pytest.mark.booted
async def test_fence_scsi_three_guests_and_aptpl_restart(run_dir: Path) -> None:
    started = time.monotonic()
    ka, kb, kc = (NODES[n][1] for n in "abc")
    image = run_dir / "lu0.img"
    async with bridge(run_dir, ["a", "b", "c"]) as target:
        async with guests(run_dir, ["a", "b", "c"]) as g:
            booted = time.monotonic()
            for n in "abc":
                await ok(g[n], WAIT)
            # 1. every node registers its own key (REGISTER AND IGNORE EXISTING KEY)
            for n in "abc":
                await ok(g[n], f"{PROUT} --register-ignore --param-sark=0x{NODES[n][1]:x} /dev/sg0")
            assert sorted(keys_in(await ok(g["b"], "sg_persist -n -k /dev/sg0"))) == [ka, kb, kc]
            # 2. A reserves Write Exclusive - Registrants Only
            await ok(g["a"], f"{PROUT} --reserve --param-rk=0x{ka:x} --prout-type={WERO} /dev/sg0")
            out = await ok(g["c"], "sg_persist -n -r /dev/sg0")
            assert re.search(rf"Key=0x{ka:x}\b", out), out
            assert "type: Write Exclusive, registrants only" in out, out
            # a registrant that is not the holder may write under WERO
            out = await ok(g["c"], write_block(BLOCK_C_BEFORE, "C-BEFORE"))
            assert "WRITE-RC=0" in out, out
            # 3. A fences C: PREEMPT AND ABORT with C's key as SERVICE ACTION RESERVATION KEY
            await ok(g["a"], f"{PROUT} --preempt-abort --param-rk=0x{ka:x} --param-sark=0x{kc:x} "
                             f"--prout-type={WERO} /dev/sg0")
            assert sorted(keys_in(await ok(g["a"], "sg_persist -n -k /dev/sg0"))) == [ka, kb]
            # 4. C's next command reports the preemption on C's nexus (SPC-4 5.13.11.2.4)
            r = await run(g["c"], "sg_turs -v /dev/sg0")
            assert r.rc != 0 and re.search(r"[Rr]egistrations preempted", r.output), r.output
            # ... C's writes conflict, through the block layer and as raw SCSI status
            out = await ok(g["c"], write_block(BLOCK_C, "C-FENCED"))
            assert "WRITE-RC=0" not in out and re.search(r"WRITE-RC=[1-9]", out), out
            r = await run(g["c"], f"sg_raw -s 512 -i /tmp/C-FENCED.blk /dev/sg0 "
                                  f"2a 00 00 00 {BLOCK_C * 8 >> 8 & 0xFF:02x} {BLOCK_C * 8 & 0xFF:02x} "
                                  "00 00 01 00")
            assert r.rc != 0 and re.search(r"SCSI Status: Reservation Conflict", r.output, re.I), r.output
            # ... while the reservation holder and the other registrant write
            for n, block in (("a", BLOCK_A), ("b", BLOCK_B)):
                out = await ok(g[n], write_block(block, f"{n.upper()}-WRITES"))
                assert "WRITE-RC=0" in out, out
            # ... and C still reads (WERO allows reads from anyone), seeing A's data
            out = await ok(g["c"], "echo 3 >/proc/sys/vm/drop_caches; " + read_block(BLOCK_A))
            assert out.startswith("A-WRITES-00000000000000000000000001"), out
            # 5. READ FULL STATUS: every registrant with its iSCSI TransportID name
            out = await ok(g["b"], "sg_persist -n -s /dev/sg0")
            for n in "ab":
                assert NODES[n][0] in out, out
            assert NODES["c"][0] not in out, out
            assert "Reservation holder" in out and "registrants only" in out, out
            # 6. APTPL: A re-registers its own key with APTPL=1 (SPC-4 5.13.5)
            await ok(g["a"], f"{PROUT} --register-ignore --param-sark=0x{ka:x} --param-aptpl /dev/sg0")
            out = await ok(g["a"], "sg_persist -n -c /dev/sg0")
            assert "Persist Through Power Loss Active(PTPL_A): 1" in out, out
            steps_done = time.monotonic()
        assert target.logical_unit("lu0").reservations.status()["aptpl"] is True
    # the bridge is gone; the state file next to the image holds the APTPL state
    assert (run_dir / "lu0.img.pr.json").exists()
    with image.open("rb") as f:
        f.seek(BLOCK_C * 4096)
        assert f.read(4096) == bytes(4096), "a fenced write reached the image"
        for block, tag in ((BLOCK_A, b"A-WRITES"), (BLOCK_C_BEFORE, b"C-BEFORE"), (BLOCK_B, b"B-WRITES")):
            f.seek(block * 4096)
            assert f.read(len(tag)) == tag, block
    # `vscsi-bridge status` on a configuration describing this bridge: names and the saved state
    out = await status_of(run_dir)
    assert set(out["initiators"]) == {NODES[n][0] for n in NODES}, out
    saved = out["logical_units"]["lu0"]["reservations"]
    assert saved["aptpl"] is True and saved["reservation"] == {"type": WERO, "scope": 0,
                                                               "holder": NODES["a"][0]}, saved
    assert {(r["initiator"], r["key"]) for r in saved["registrations"]} == {
        (NODES["a"][0], ka), (NODES["b"][0], kb)}, saved
    first_bridge = time.monotonic()

    # restart: a new Target on the same image and sockets, fresh guests
    async with bridge(run_dir, ["a", "c"]) as target:
        status = target.logical_unit("lu0").reservations.status()
        assert (status["type"], status["holder"], status["aptpl"]) == ("WERO", NODES["a"][0], True), status
        async with guests(run_dir, ["a", "c"]) as g:
            for n in "ac":
                await ok(g[n], WAIT)
            out = await ok(g["c"], "sg_persist -n -r /dev/sg0")
            assert re.search(rf"Key=0x{ka:x}\b", out), out
            assert "type: Write Exclusive, registrants only" in out, out
            assert sorted(keys_in(await ok(g["c"], "sg_persist -n -k /dev/sg0"))) == [ka, kb]
            out = await ok(g["a"], "sg_persist -n -c /dev/sg0")
            assert "Persist Through Power Loss Active(PTPL_A): 1" in out, out
            out = await ok(g["c"], write_block(BLOCK_C, "C-AFTER"))
            assert re.search(r"WRITE-RC=[1-9]", out), out  # still fenced
            out = await ok(g["a"], write_block(BLOCK_A + 4, "A-AFTER"))
            assert "WRITE-RC=0" in out, out
    done = time.monotonic()
    print(f"TIMING boot(3 guests) {booted - started:.1f} s, fence steps {steps_done - booted:.1f} s, "
          f"first bridge total {first_bridge - started:.1f} s, restart+2 guests {done - first_bridge:.1f} s, "
          f"whole test {done - started:.1f} s")


# --- the two-initiator checks that iscsi-test-cu skips over SG_IO -------------------------
# (test_pr_iscsi_test_cu.EXPECTED_SKIPS): the same checks, each initiator a booted guest.

PRELUDE = r"""
dev=/dev/sg0
head -c 512 /dev/zero >/tmp/z
# TEST UNIT READY until GOOD or RESERVATION CONFLICT (sg3_utils exit status 24, an
# SPC-2 reservation held elsewhere): consumes pending unit attentions
tur() { n=0; while :; do sg_turs $dev >/dev/null 2>&1; case $? in 0|24) return 0;; esac
        n=$((n+1)); [ $n -ge 8 ] && { echo TUR-STUCK; return 1; }; done; }
st() { o=$("$@" 2>&1); rc=$?; case "$o" in *"Reservation Conflict"*) echo "$1 CONFLICT";;
       *) if [ $rc -eq 0 ]; then echo "$1 OK"; else echo "$1 ERR rc=$rc"; echo "$o"; fi;; esac; }
rd() { tur; st sg_raw -r 512 -o /dev/null $dev 28 00 00 00 00 40 00 00 01 00; }
wr() { tur; st sg_raw -s 512 -i /tmp/z $dev 2a 00 00 00 00 40 00 00 01 00; }
po() { tur; sg_persist -n --out "$@" $dev; }
reserve6() { tur; st sg_raw $dev 16 00 00 00 00 00; }
release6() { tur; st sg_raw $dev 17 00 00 00 00 00; }
msense() { tur; st sg_raw -r 252 -o /dev/null $dev 1a 00 3f 00 fc 00; }
"""
# the guest's virtio_scsi driver releases / takes its device (virtio device reset in between)
UNBIND = ("d=$(basename $(readlink -f /sys/bus/virtio/drivers/virtio_scsi/virtio*)) && echo $d >/tmp/vdev"
          " && echo $d >/sys/bus/virtio/drivers/virtio_scsi/unbind && [ ! -e /dev/sg0 ]")
BIND = "echo $(cat /tmp/vdev) >/sys/bus/virtio/drivers/virtio_scsi/bind && " + WAIT
# SPC-4 table 212 / 5.13.1: (name printed by sg_persist, all-registrants type,
# registered other: read, write; unregistered other: read, write)
TYPES = {
    1: ("Write Exclusive", False, (True, False), (True, False)),
    3: ("Exclusive Access", False, (False, False), (False, False)),
    5: ("Write Exclusive, registrants only", False, (True, True), (True, False)),
    6: ("Exclusive Access, registrants only", False, (True, True), (False, False)),
    7: ("Write Exclusive, all registrants", True, (True, True), (True, False)),
    8: ("Exclusive Access, all registrants", True, (True, True), (False, False)),
}


async def sh(g: GuestSession, script: str) -> str:
    return await ok(g, PRELUDE + script)


def access(out: str) -> tuple[bool, bool]:
    """(read allowed, write allowed) from the ``rd; wr`` lines."""
    verdicts = re.findall(r"^sg_raw (OK|CONFLICT|ERR.*)$", out, re.MULTILINE)
    assert len(verdicts) == 2 and not any(v.startswith("ERR") for v in verdicts), out
    return verdicts[0] == "OK", verdicts[1] == "OK"


def reservation_of(out: str) -> tuple[int, str] | None:
    """(key, type name) from ``sg_persist -n -r``, None when nothing is reserved."""
    if "there is NO reservation held" in out:
        return None
    key = re.search(r"Key=(0x[0-9a-f]+)", out)
    rtype = re.search(r"type: (.+?)\s*$", out, re.MULTILINE)
    assert key and rtype, out
    return int(key.group(1), 16), rtype.group(1)


@pytest.mark.booted
async def test_two_initiator_access_ownership_preempt_reserve6(run_dir: Path) -> None:
    """Reservation access and ownership for every type, SPEC_I_PT and REGISTER AND MOVE with
    real TransportIDs, PREEMPT removing a registration, RESERVE(6) between two initiators,
    across a LOGICAL UNIT RESET and across I_T nexus losses."""
    started = time.monotonic()
    ka, kb = NODES["a"][1], NODES["b"][1]
    async with bridge(run_dir, ["a", "b"]) as target, guests(run_dir, ["a", "b"]) as g:
        x, y = g["a"], g["b"]
        booted = time.monotonic()
        for rtype, (name, all_reg, reg_rw, unreg_rw) in TYPES.items():
            # access (libiscsi ProutReserve.Access*): X holds, Y registered then not
            await sh(x, f"po --register-ignore --param-sark=0x{ka:x}")
            await sh(y, f"po --register-ignore --param-sark=0x{kb:x}")
            out = await sh(x, f"po --reserve --param-rk=0x{ka:x} --prout-type={rtype}; "
                              "sg_persist -n -r $dev; rd; wr")
            # SPC-4 6.15.3: the key reads as zero for an all-registrants reservation
            assert reservation_of(out) == (0 if all_reg else ka, name), (rtype, out)
            assert access(out) == (True, True), (rtype, out)
            assert access(await sh(y, "rd; wr")) == reg_rw, rtype
            assert access(await sh(y, f"po --register --param-rk=0x{kb:x} --param-sark=0; rd; wr")) \
                == unreg_rw, rtype
            out = await sh(x, f"po --release --param-rk=0x{ka:x} --prout-type={rtype}; "
                              f"po --register --param-rk=0x{ka:x} --param-sark=0; "
                              "sg_persist -n -r $dev; sg_persist -n -k $dev")
            assert reservation_of(out) is None and "there are NO registered" in out, (rtype, out)
            # ownership (ProutReserve.Ownership*): the holder unregisters; an
            # all-registrants reservation stays with the remaining registrant
            # (SPC-4 5.13.11.2.3), any other is released
            await sh(x, f"po --register-ignore --param-sark=0x{ka:x}")
            await sh(y, f"po --register-ignore --param-sark=0x{kb:x}")
            out = await sh(x, f"po --reserve --param-rk=0x{ka:x} --prout-type={rtype}; "
                              f"po --register --param-rk=0x{ka:x} --param-sark=0; sg_persist -n -r $dev")
            if all_reg:
                assert reservation_of(out) == (0, name), (rtype, out)
                out = await sh(y, f"po --release --param-rk=0x{kb:x} --prout-type={rtype}; "
                                  "sg_persist -n -r $dev")
            assert reservation_of(out) is None, (rtype, out)
            await sh(y, f"po --register --param-rk=0x{kb:x} --param-sark=0")
        status = target.logical_unit("lu0").reservations.status()
        assert status["registrants"] == [] and status["holder"] is None, status
        matrix_done = time.monotonic()

        # TransportIDs as sg3_utils encodes them (SPC-4 7.6.4.6 iSCSI, format 00b; with
        # --register sg_persist sets SPEC_I_PT): SPEC_I_PT
        # registers another initiator port with the same key, REGISTER AND MOVE hands the
        # reservation to another initiator port (SPC-4 5.13.8)
        tid_b = f"--transport-id={NODES['b'][0]}"
        out = await sh(x, f"po --register --param-sark=0x{ka:x} {tid_b}; "
                          "sg_persist -n -s $dev")
        assert re.findall(r"Key=(0x[0-9a-f]+)", out) == [f"0x{ka:x}"] * 2, out
        assert NODES["a"][0] in out and NODES["b"][0] in out, out
        await sh(y, f"po --register --param-rk=0x{ka:x} --param-sark=0")
        out = await sh(x, f"po --reserve --param-rk=0x{ka:x} --prout-type=1; "
                          f"po --register-move --param-rk=0x{ka:x} --param-sark=0x{kb:x} --prout-type=1 "
                          f"{tid_b} --relative-target-port=1; sg_persist -n -r $dev; rd; wr")
        assert reservation_of(out) == (kb, "Write Exclusive"), out
        assert access(out) == (True, False), out  # X is still registered but no longer holds it
        out = await sh(y, "sg_persist -n -s $dev; rd; wr")
        assert access(out) == (True, True), out
        assert re.search(rf"Key=0x{kb:x}\n(.*\n)*?\s+<< Reservation holder >>(.*\n)*?\s+iSCSI name: "
                         rf"{re.escape(NODES['b'][0])}", out), out
        await sh(y, f"po --release --param-rk=0x{kb:x} --prout-type=1; "
                    f"po --register --param-rk=0x{kb:x} --param-sark=0")
        await sh(x, f"po --register --param-rk=0x{ka:x} --param-sark=0")

        # PREEMPT with no reservation removes the preempted registration (ProutPreempt.RemoveRegistration)
        await sh(x, f"po --register-ignore --param-sark=0x{ka:x}")
        out = await sh(y, f"po --register-ignore --param-sark=0x{kb:x}; sg_persist -n -k $dev")
        assert sorted(keys_in(out)) == [ka, kb], out
        gen = int(re.search(r"PR generation=(0x[0-9a-f]+)", out).group(1), 16)  # type: ignore[union-attr]
        out = await sh(y, f"po --preempt --param-rk=0x{kb:x} --param-sark=0x{ka:x} --prout-type=3; "
                          "sg_persist -n -k $dev; sg_persist -n -r $dev")
        assert keys_in(out) == [kb] and f"PR generation=0x{gen + 1:x}," in out, out
        assert reservation_of(out) is None, out
        r = await run(x, "sg_turs -v /dev/sg0")
        assert r.rc != 0 and "Registrations preempted" in r.output, r.output
        await sh(y, f"po --register --param-rk=0x{kb:x} --param-sark=0")

        # RESERVE(6)/RELEASE(6) between two initiators (Reserve6.2Initiators, SPC-2 5.5.1)
        assert await sh(x, "reserve6; reserve6") == "sg_raw OK\n" * 2  # the holder may repeat it
        # the other initiator: RESERVE conflicts, RELEASE is a no-op, MODE SENSE and READ
        # conflict, and so does PERSISTENT RESERVE IN (SPC-2 5.5.1: from any initiator)
        out = await sh(y, "reserve6; release6; reserve6; msense; rd; sg_persist -n -k $dev; echo PRIN-RC=$?")
        assert out.startswith("sg_raw CONFLICT\nsg_raw OK\n" + "sg_raw CONFLICT\n" * 3), out
        assert "PRIN-RC=24" in out, out  # sg3_utils' exit status for RESERVATION CONFLICT
        assert await sh(x, "msense; rd; wr") == "sg_raw OK\n" * 3
        assert "sg_raw OK" in await sh(x, "release6")
        assert await sh(y, "reserve6; release6") == "sg_raw OK\nsg_raw OK\n"
        # a LOGICAL UNIT RESET releases it (Reserve6.LUNReset, SPC-2 5.5.1)
        assert "sg_raw OK" in await sh(x, "reserve6")
        r = await run(x, "sg_reset -d /dev/sg0")
        assert r.rc == 0, r.output
        assert await sh(y, "reserve6; rd; wr; release6") == "sg_raw OK\n" * 4

        # I_T nexus loss (Reserve6.ITNexusLoss; SPC-4 5.13.1, SPC-2 5.5.1): X's driver lets
        # go of its virtio-scsi device (the device is reset), then takes it again. The SPC-2
        # reservation is gone, persistent registrations stay.
        assert "sg_raw OK" in await sh(x, "reserve6")
        await ok(x, UNBIND)
        assert await sh(y, "reserve6; release6") == "sg_raw OK\n" * 2
        await ok(x, BIND)
        await sh(x, f"po --register-ignore --param-sark=0x{ka:x}")
        await ok(x, UNBIND)
        assert keys_in(await sh(y, "sg_persist -n -k $dev")) == [ka]
        await ok(x, BIND)
        out = await sh(x, f"sg_persist -n -k $dev; po --register --param-rk=0x{ka:x} --param-sark=0; reserve6")
        assert keys_in(out) == [ka] and out.endswith("sg_raw OK\n"), out
        # ... and the guest going away altogether (QEMU gone: vfio-user client disconnect)
        assert "sg_raw CONFLICT" in await sh(y, "reserve6")
        assert await x.poweroff() is not None
        assert await sh(y, "reserve6; rd; wr; release6") == "sg_raw OK\n" * 4
    done = time.monotonic()
    print(f"TIMING boot(2 guests) {booted - started:.1f} s, 6-type access+ownership matrix "
          f"{matrix_done - booted:.1f} s, whole test {done - started:.1f} s")
