"""Booted: the bridge's own Xen backend (bridge/xen, run from this checkout in a PV dom0, xen-scsiback
not loaded) serving a PV domU through the real xen-scsifront, everything in ONE Xen boot:

1. the domU sees exactly its configured LUNs (0 and 1; LUN 2 is asked for in the xenstore nodes but
   mapped only for another initiator, so the backend must refuse it) with the right INQUIRY, VPD 80h/83h
   (configured identity for LU disk0, identity sidecar for disk1) and capacity; REPORT LUNS lists 0, 1;
2. fio verify=crc32c, 256 KiB requests at iodepth 16 (64 pages: more than VSCSIIF_SG_TABLESIZE, so
   xen-scsifront uses VSCSIIF_SG_GRANT; the bridge side records the request sizes it saw);
3. LUN hotplug while the domU runs: Target.map_lun (LUN 2 added) then Target.unmap_lun (LUN 1
   removed), the backend's own Reconfiguring/Reconfigured path;
4. sg_reset -d from the domU: VSCSIIF_ACT_SCSI_RESET -> LOGICAL UNIT RESET, answered;
   then fence_scsi-style persistent-reservation fencing (SPC-4 5.13) on LU disk0 between the domU
   (sg_persist) and a second initiator, the dom0 driver script itself (Target.execute with its own
   InitiatorPort): both register, the domU reserves Write Exclusive Registrants Only, READ FULL STATUS
   shows both iSCSI names, dom0 PREEMPT AND ABORTs the domU's key, the domU gets REGISTRATIONS
   PREEMPTED, its writes fail with RESERVATION CONFLICT and its reads still work; dom0 CLEARs;
5. the domU reboots itself (on_reboot=restart: a new domid), is attached again and finds the data it
   wrote before the reboot (an md5-checked block and fio --verify_only over the fio region).

History: until the shared-ring index fix (struct.pack_into zeroes an index before storing it,
so xen-scsifront could read req_event or rsp_prod as 0) the domU's probe of a hot-added LUN, or of
the LUNs after the reboot, sometimes got no answer; this test was then kept out of the suite.

The bridge process in dom0 is a small driver script (BRIDGE_SCRIPT below) around
bridge.xen.runner.run_xen_backend with a file-based control channel for map/unmap/stats.
"""

from __future__ import annotations

import json
import re

import pytest

from harness.xen import XenResult, run_xen

pytestmark = pytest.mark.booted

INITIATOR = "iqn.2026-11.org.vscsi-bridge:xen.domu.0"
OTHER_INITIATOR = "iqn.2026-11.org.vscsi-bridge:xen.other.0"
# The second initiator on LU disk0 (LUN 0 for it too): the dom0 driver script, for the PR fencing step.
FENCER = "iqn.2026-11.org.vscsi-bridge:dom0.fencer"
DOMU_KEY = "0xabcd1234"
FENCER_KEY = "0xd0d0f00d"
# disk0: identity from the configuration; disk1: from its identity sidecar written before the start.
WWN0 = "naa.600a5c5100000000c0ffee0000000001"
SERIAL0 = "CFG-LUN0-SERIAL"
WWN1 = "naa.600a5c5100000000c0ffee0000000002"
SERIAL1 = "SIDECAR-LUN1"
SERIAL2 = "HOTPLUG-LUN2"
SERIAL_OTHER = "OTHER-INITIATOR-LU"
SIZES_MIB = {"disk0": 64, "disk1": 8, "disk2": 12, "other": 4}
PATTERN1 = "VSCSI-PATTERN-DISK1"
PATTERN2 = "VSCSI-PATTERN-DISK2"
# More than VSCSIIF_SG_TABLESIZE (26) pages of data in one request needs VSCSIIF_SG_GRANT.
SG_TABLESIZE_BYTES = 26 * 4096
# Phase 5 (domU reboot, attach again, data intact) in the same boot.
WITH_REBOOT = True

BRIDGE_SCRIPT = rf'''
"""dom0: the bridge's Xen backend from /vscsi/src with four LUs and a control directory."""
import json
import logging
import os
import signal
import struct
import sys
import time

sys.path.insert(0, "/vscsi/src")
import trio

from bridge.scsi.logical_unit import LogicalUnitSpec
from bridge.scsi.reservations import pr_in_cdb, pr_out_cdb
from bridge.scsi.target import Target
from bridge.scsi.request import InitiatorPort, ScsiRequest
from bridge.xen.runner import XenConfig, XenDomainConfig, run_xen_backend
from bridge.xen.toolstack import attach
from bridge.xen.xenstore import open_dom0_xenstore

log = logging.getLogger("bridge-test")


class ObservedTarget(Target):
    """The target core, counting what the backend hands it (request sizes, TMFs)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stats = {{"commands": 0, "max_bytes": 0, "beyond_sg_tablesize": 0, "tmfs": {{}}}}

    def submit(self, req):  # every command, answered at once or not, and execute() too
        n = sum(len(b) for b in req.data_in) + sum(len(b) for b in req.data_out)
        self.stats["commands"] += 1
        self.stats["max_bytes"] = max(self.stats["max_bytes"], n)
        if n > {SG_TABLESIZE_BYTES}:
            self.stats["beyond_sg_tablesize"] += 1
        return super().submit(req)

    async def task_management(self, tmf):
        rsp = await super().task_management(tmf)
        key = f"{{tmf.function.name}}:{{rsp.response.name}}"
        self.stats["tmfs"][key] = self.stats["tmfs"].get(key, 0) + 1
        return rsp


async def persistent_reserve(target, words):
    """pr out SA TYPE RKEY SARK | pr in SA: PERSISTENT RESERVE OUT/IN (SPC-4 6.15/6.16) on LUN 0
    as the second initiator {FENCER}; unit attentions (power on, reset) are taken and retried."""
    port = InitiatorPort("{FENCER}")
    buf = None
    if words[0] == "out":
        params = struct.pack(">QQ8x", int(words[3], 0), int(words[4], 0))  # RK, SARK, flags 0
        cdb, bufs = pr_out_cdb(int(words[1]), int(words[2]), len(params)), {{"data_out": [memoryview(params)]}}
    else:
        buf = bytearray(1024)
        cdb, bufs = pr_in_cdb(int(words[1]), len(buf)), {{"data_in": [memoryview(buf)]}}
    for attempt in range(8):
        rsp = await target.execute(ScsiRequest(lun=0, tag=0xF000 + attempt, cdb=cdb,
                                               initiator=port, **bufs))
        sense = bytes(rsp.sense)
        key = 0 if len(sense) < 3 else (sense[1] if sense[0] & 0x7F >= 0x72 else sense[2]) & 0xF
        if key != 6:  # UNIT ATTENTION
            break
    text = f"status=0x{{rsp.status:02x}} sense={{sense.hex()}}"
    if rsp.status != 0:
        return "error " + text
    if buf is not None and int(words[1]) == 0:  # READ KEYS
        n = struct.unpack_from(">I", buf, 4)[0] // 8
        text += " keys=" + ",".join(hex(k) for k in struct.unpack_from(f">{{n}}Q", buf, 8))
    elif buf is not None:  # READ RESERVATION
        if struct.unpack_from(">I", buf, 4)[0] >= 16:
            text += f" reservation key={{hex(struct.unpack_from('>Q', buf, 8)[0])}} type={{buf[21] & 0xF}}"
        else:
            text += " no reservation"
    return "ok " + text


async def command(target, xs, words):
    if words[0] == "pr":
        return await persistent_reserve(target, words[1:])
    if words[0] == "attach":  # attach DOMID LUN...: the toolstack part (bridge.xen.toolstack)
        await attach(xs, int(words[1]), 0, [int(w) for w in words[2:]])
    elif words[0] == "map":
        target.map_lun("{INITIATOR}", int(words[1]), words[2])
    elif words[0] == "unmap":
        target.unmap_lun("{INITIATOR}", int(words[1]))
    elif words[0] == "debug":  # the backend's per-request log lines from now on
        logging.getLogger().setLevel(logging.DEBUG)
    elif words[0] != "stats":
        return "error unknown command"
    return "ok " + json.dumps(dict(target.stats, luns=target.luns_for("{INITIATOR}")))


async def control(ctl, target, xs):
    cmd = os.path.join(ctl, "cmd")
    while True:
        await trio.sleep(0.2)
        if not os.path.exists(cmd):
            continue
        with open(cmd) as f:
            words = f.read().split()
        try:
            reply = await command(target, xs, words) if words else "error empty"
        except Exception as exc:
            reply = f"error {{exc!r}}"
        log.info("control %s: %s", words, reply)
        with open(os.path.join(ctl, "reply.tmp"), "w") as f:
            f.write(reply + "\n")
        os.unlink(cmd)
        os.rename(os.path.join(ctl, "reply.tmp"), os.path.join(ctl, "reply"))


async def main(ctl):
    mib = 1 << 20
    specs = [
        LogicalUnitSpec(name="disk0", path="/tmp/disk0.img", size={SIZES_MIB["disk0"]} * mib,
                        wwn="{WWN0}", serial="{SERIAL0}"),
        LogicalUnitSpec(name="disk1", path="/tmp/disk1.img", size={SIZES_MIB["disk1"]} * mib),
        LogicalUnitSpec(name="disk2", path="/tmp/disk2.img", size={SIZES_MIB["disk2"]} * mib,
                        serial="{SERIAL2}"),
        LogicalUnitSpec(name="other", path="/tmp/other.img", size={SIZES_MIB["other"]} * mib,
                        serial="{SERIAL_OTHER}"),
    ]
    target = ObservedTarget(specs, {{"{INITIATOR}": {{0: "disk0", 1: "disk1"}},
                                     "{OTHER_INITIATOR}": {{2: "other"}},
                                     "{FENCER}": {{0: "disk0"}}}})
    config = XenConfig(grant_strategy="auto",  # the default: copy small requests, map large
                       domains=[XenDomainConfig(name="domu", initiator="{INITIATOR}")])
    started = time.monotonic()
    try:
        async with open_dom0_xenstore() as xs, trio.open_nursery() as nursery:
            await nursery.start(run_xen_backend, target, None, config)
            nursery.start_soon(control, ctl, target, xs)
            with open(os.path.join(ctl, "ready"), "w") as f:
                f.write("ready\n")
            print("bridge-test: serving", flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
    finally:
        target.close()
        print(f"bridge-test: stopped after {{time.monotonic() - started:.1f}} s", flush=True)


logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
trio.run(main, sys.argv[1])
'''

DOM0_SCRIPT = rf"""
set -u
export DOMU_FIO=1
T0=$(cut -d' ' -f1 /proc/uptime)
step() {{ echo "STEP $(awk "BEGIN {{printf \"%.1f\", $(cut -d' ' -f1 /proc/uptime) - $T0}}") $*"; }}
# wait_guest TEXT TIMEOUT_S [COUNT]: until the domU console shows TEXT (COUNT times: it reboots).
wait_guest() {{
    _i=0
    until [ "$(domu_console domu | tr -d '\r' | grep -c "$1")" -ge "${{3:-1}}" ]; do
        _i=$((_i + 1))
        [ $_i -gt $(($2 * 2)) ] && {{ echo "dom0: no '$1' from the domU after $2 s"; return 1; }}
        sleep 0.5
    done
}}
ctl() {{
    rm -f /tmp/ctl/reply
    echo "$*" >/tmp/ctl/cmd.tmp && mv /tmp/ctl/cmd.tmp /tmp/ctl/cmd
    _i=0
    until [ -f /tmp/ctl/reply ]; do
        _i=$((_i + 1)); [ $_i -gt 1200 ] && {{ echo "CTL $*: no reply"; return 1; }}
        sleep 0.1
    done
    echo "CTL $*: $(cat /tmp/ctl/reply)"
    grep -q '^ok' /tmp/ctl/reply
}}
finish() {{
    ctl stats
    step "stopping the bridge"
    kill -TERM "$BPID" 2>/dev/null
    _i=0
    while kill -0 "$BPID" 2>/dev/null && [ $_i -lt 100 ]; do sleep 0.1; _i=$((_i + 1)); done
    if kill -0 "$BPID" 2>/dev/null; then
        echo "BRIDGE-EXIT: still running 10 s after SIGTERM, killed"; kill -KILL "$BPID"
    else
        wait "$BPID"; echo "BRIDGE-EXIT: rc $?"
    fi
    echo "--- bridge log (without DEBUG) ---"
    grep -v ' DEBUG ' /vscsi/run/bridge.log | tail -150
    echo "--- bridge DEBUG lines (last 150) ---"
    grep ' DEBUG ' /vscsi/run/bridge.log | tail -150
    echo "--- end of bridge log ---"
}}

mkdir -p /tmp/ctl
truncate -s {SIZES_MIB["disk0"]}M /tmp/disk0.img
truncate -s {SIZES_MIB["disk1"]}M /tmp/disk1.img
truncate -s {SIZES_MIB["disk2"]}M /tmp/disk2.img
truncate -s {SIZES_MIB["other"]}M /tmp/other.img
printf '{PATTERN1}' | dd of=/tmp/disk1.img conv=notrunc status=none
printf '{PATTERN2}' | dd of=/tmp/disk2.img conv=notrunc status=none
echo '{{"wwn": "{WWN1}", "serial": "{SERIAL1}"}}' >/tmp/disk1.img.vscsi-id.json
# The bridge starts (Python under TCG: slow) while the domU boots.
python3 /vscsi/run/bridge.py /tmp/ctl >/vscsi/run/bridge.log 2>&1 &
BPID=$!
dom=$(domu_create domu /vscsi/run/guest.sh) || exit 11
xl unpause domu
domu_wait_booted domu 600 || {{ finish; exit 12; }}
step "domU booted (domid $dom)"
i=0
until [ -f /tmp/ctl/ready ]; do
    i=$((i + 1))
    if [ $i -gt 3000 ] || ! kill -0 $BPID 2>/dev/null; then echo "bridge did not start"; cat /vscsi/run/bridge.log; exit 10; fi
    sleep 0.1
done
step "bridge ready"
# LUN 2 is mapped only for another initiator: the backend must refuse that dev.
ctl attach "$dom" 0 1 2 || {{ finish; exit 13; }}
step "attached"
# Persistent-reservation fencing on disk0: this script's bridge is the second initiator.
wait_guest " pr-registered$" 900 || {{ finish; exit 21; }}
step "domU checked LUNs, fio, reset; registered"
ctl pr out 6 0 0 {FENCER_KEY} || {{ finish; exit 22; }}  # REGISTER AND IGNORE EXISTING KEY
wait_guest " pr-reserved$" 120 || {{ finish; exit 23; }}
ctl pr out 5 5 {FENCER_KEY} {DOMU_KEY} || {{ finish; exit 24; }}  # PREEMPT AND ABORT, type 5
ctl pr in 1
ctl pr in 0
wait_guest " pr-fenced$" 120 || {{ finish; exit 25; }}
ctl pr out 3 0 {FENCER_KEY} 0 || {{ finish; exit 26; }}  # CLEAR
step "domU fenced; reservation cleared"
wait_guest "hotplug-add-ready" 300 || {{ finish; exit 14; }}
step "domU checked the clear"
ctl map 2 disk2
wait_guest "hotplug-remove-ready" 300 || {{ finish; exit 15; }}
step "domU saw LUN 2 added"
ctl unmap 1
if [ {int(WITH_REBOOT)} = 0 ]; then
    domu_wait_gone domu 600 || {{ finish; exit 16; }}
else
wait_guest " rebooting$" 300 || {{ finish; exit 16; }}
step "domU saw LUN 1 removed, rebooting"
i=0
dom2=
until [ -n "$dom2" ] && [ "$dom2" != "$dom" ]; do
    i=$((i + 1)); [ $i -gt 600 ] && {{ echo "domU did not come back"; finish; exit 17; }}
    sleep 0.5
    dom2=$(xl domid domu 2>/dev/null)
done
wait_guest VSCSI-DOMU-BOOTED 600 2 || {{ finish; exit 18; }}
step "domU rebooted (domid $dom2)"
ctl debug
ctl attach "$dom2" 0 2 || {{ finish; exit 19; }}
domu_wait_gone domu 400 || {{ finish; exit 20; }}
fi
step "domU powered off"
rc=$(domu_rc domu)
echo "domU rc: $rc"
echo "--- xenstore backend (should be reaped) ---"; xs_dump /local/domain/0/backend/vscsi
finish
step "done"
[ "$rc" = 0 ]
"""

GUEST_SCRIPT = rf"""
up() {{ cut -d' ' -f1 /proc/uptime; }}
say() {{ echo "GUEST $*"; }}
luns() {{ ls /sys/class/scsi_device 2>/dev/null | sed 's/.*://' | sort -n | tr '\n' ' ' | sed 's/ $//'; }}
# dev LUN block|scsi_generic: the /dev node of that LUN (v-dev 0:0:0:LUN of this guest's host)
dev() {{
    for p in /sys/class/scsi_device/*:0:0:$1/device/$2/*; do
        [ -e "$p" ] && {{ echo "/dev/${{p##*/}}"; return 0; }}
    done
    return 1
}}
wait_dev() {{ # LUN KIND TIMEOUT_S
    _i=0
    until dev $1 $2 >/dev/null && [ -e "$(dev $1 $2)" ]; do
        _i=$((_i + 1)); [ $_i -gt $(($3 * 10)) ] && {{ say "no $2 device for LUN $1" >&2; return 1; }}
        sleep 0.1
    done
    dev $1 $2
}}
wait_luns() {{ # "SORTED LUNS" TIMEOUT_S: until exactly those LUNs exist
    _i=0
    while [ "$(luns)" != "$1" ]; do
        _i=$((_i + 1)); [ $_i -gt $(($2 * 10)) ] && {{ say "LUNs '$(luns)', expected '$1'"; return 1; }}
        sleep 0.1
    done
}}
fail() {{ # RC: what the guest sees, then exit
    say "FAIL $1: LUNs '$(luns)', block devices: $(ls /sys/block | tr '\n' ' ')"
    dmesg | tail -40 | sed 's/^/DMESG /'
    exit $1
}}
clear_ua() {{ sg_turs "$1" >/dev/null 2>&1; sg_turs "$1" >/dev/null 2>&1; }}
describe() {{ # LUN: INQUIRY, VPD 80h/83h, READ CAPACITY, each line prefixed "L<LUN> "
    _sg=$(wait_dev $1 scsi_generic 30) && _blk=$(wait_dev $1 block 30) || return 1
    clear_ua $_sg
    {{ sg_inq $_sg; sg_vpd -p sn $_sg; sg_vpd -p di $_sg; sg_readcap $_blk; }} 2>&1 | sed "s/^/L$1 /"
}}
report_luns() {{ # PREFIX: REPORT LUNS through LUN 0
    _sg=$(dev 0 scsi_generic); clear_ua $_sg
    sg_luns $_sg 2>&1 | sed "s/^/$1 /"
}}
FIO="--name=verify --direct=1 --ioengine=libaio --rw=randwrite --bs=256k --iodepth=16 --size=16M --verify=crc32c --verify_fatal=1"
MARK_SECTOR=98304   # 48 MiB into LUN 0, beyond the fio region (16 MiB) and the reboot block (32 MiB)

i=0
until [ -n "$(luns)" ]; do
    i=$((i + 1)); [ $i -gt 3000 ] && fail 1
    sleep 0.1
done
say "t=$(up) first LUN"
d0=$(wait_dev 0 block 180) || fail 2
mark=$(dd if=$d0 bs=512 skip=$MARK_SECTOR count=1 2>/dev/null | tr -d '\000' | head -c 100)
case "$mark" in
VSCSI-REBOOT-MARK*)
    say "boot 2"
    wait_luns "0 2" 120 || fail 30
    sleep 2
    say "luns after reboot: $(luns)"
    want=${{mark#*md5=}}; want=${{want%% *}}
    got=$(dd if=$d0 bs=1M skip=32 count=1 iflag=direct 2>/dev/null | md5sum | cut -c1-32)
    say "reboot data: want $want got $got"
    fio --filename=$d0 $FIO --verify_only >/tmp/fio2.out 2>&1
    rc=$?
    sed 's/^/FIO2 /' /tmp/fio2.out
    say "fio verify_only rc=$rc"
    exit 0
    ;;
esac

say "boot 1"
wait_luns "0 1" 120 || fail 3
sleep 3  # a refused LUN 2 would have appeared by now
say "luns: $(luns)"
describe 0
describe 1
report_luns RL1
say "lun1 data: $(dd if=$(dev 1 block) bs=512 count=1 2>/dev/null | head -c {len(PATTERN1)})"

t=$(up)
fio --filename=$d0 $FIO >/tmp/fio.out 2>&1
rc=$?
sed 's/^/FIO /' /tmp/fio.out
say "fio rc=$rc t=$t..$(up)"

sg0=$(dev 0 scsi_generic)
sg_reset -d $sg0 >/tmp/reset.out 2>&1
rc=$?
sed 's/^/RESET /' /tmp/reset.out
say "sg_reset rc=$rc"
clear_ua $sg0
if dd if=$d0 of=/dev/null bs=4k count=16 iflag=direct 2>/dev/null; then say "read after reset ok"; fi

# fence_scsi-style: the dom0 script is the other registrant (key {FENCER_KEY}) and preempts us.
sg_persist -n --out --register-ignore --param-sark={DOMU_KEY} $sg0 >/tmp/pr.out 2>&1
say "pr register rc=$? $(tr '\n' ' ' </tmp/pr.out)"
say "t=$(up) pr-registered"
i=0
until sg_persist -n -k $sg0 2>/dev/null | grep -qi "{FENCER_KEY}"; do
    i=$((i + 1)); [ $i -gt 600 ] && fail 40
    sleep 0.2
done
sg_persist -n --out --reserve --param-rk={DOMU_KEY} --prout-type=5 $sg0 >/tmp/pr.out 2>&1
say "pr reserve rc=$? $(tr '\n' ' ' </tmp/pr.out)"
sg_persist -n -s $sg0 2>&1 | sed 's/^/PRS /'
say "t=$(up) pr-reserved"
i=0
until sg_turs $sg0 >/tmp/tur.out 2>&1; grep -qi "registrations preempted" /tmp/tur.out; do
    i=$((i + 1)); [ $i -gt 600 ] && break
    sleep 0.2
done
sed 's/^/PRUA /' /tmp/tur.out
if dd if=/dev/zero of=$d0 bs=4k count=1 seek=10240 oflag=direct conv=notrunc 2>/tmp/ddw.out; then
    say "pr fenced write succeeded"
else
    say "pr fenced write failed: $(tr '\n' ' ' </tmp/ddw.out)"
fi
say "pr fenced dmesg conflicts: $(dmesg | grep -ci 'reservation conflict')"
if dd if=$d0 of=/dev/null bs=4k count=16 iflag=direct 2>/dev/null; then say "pr fenced read ok"; fi
say "t=$(up) pr-fenced"
i=0
until sg_persist -n -k $sg0 2>/dev/null | grep -qi "no registered"; do
    i=$((i + 1)); [ $i -gt 600 ] && fail 41
    sleep 0.2
done
say "pr cleared"

say "t=$(up) hotplug-add-ready"
wait_luns "0 1 2" 180 || fail 4
say "luns after add: $(luns)"
describe 2
say "lun2 data: $(dd if=$(dev 2 block) bs=512 count=1 2>/dev/null | head -c {len(PATTERN2)})"
say "t=$(up) hotplug-remove-ready"
wait_luns "0 2" 180 || fail 5
say "luns after remove: $(luns)"
report_luns RL2
[ {int(WITH_REBOOT)} = 1 ] || exit 0

dd if=/dev/urandom of=/tmp/block bs=1M count=1 2>/dev/null
md5=$(md5sum </tmp/block | cut -c1-32)
dd if=/tmp/block of=$d0 bs=1M seek=32 conv=notrunc 2>/dev/null
printf 'VSCSI-REBOOT-MARK md5=%s end' "$md5" | dd of=$d0 bs=512 seek=$MARK_SECTOR conv=sync,notrunc 2>/dev/null
sync
say "reboot data md5=$md5"
say "t=$(up) rebooting"
sleep 1
reboot -f
"""


def _lines(text: str, prefix: str) -> str:
    return "\n".join(line[len(prefix):] for line in text.splitlines() if line.startswith(prefix))


def _reported_luns(text: str) -> set[int]:
    """LUNs in sg_luns output (8-byte LUN hex lines; SAM-5 peripheral or flat addressing)."""
    return {int(m.group(1), 16) & 0x3FFF for m in re.finditer(r"^\s*([0-9a-f]{4})[0-9a-f]{12}\s*$",
                                                               text, re.M)}


def _steps(script: str) -> list[tuple[float, str]]:
    return [(float(m.group(1)), m.group(2)) for m in re.finditer(r"^STEP ([\d.]+) (.*)$", script, re.M)]


def _check_lun(guest: str, lun: int, serial: str, wwn: str | None, last_lba: int,
               result: XenResult) -> None:
    out = _lines(guest, f"L{lun} ")
    assert re.search(r"Vendor identification:\s+VSCSIBRG", out), (lun, out, result.describe())
    assert re.search(r"Product identification:\s+vscsi-bridge", out), (lun, out)
    assert re.search(rf"Unit serial number:\s+{re.escape(serial)}\s*$", out, re.M), (lun, out)
    if wwn is not None:
        assert "0x" + wwn.removeprefix("naa.") in out.lower(), (lun, wwn, out)
    assert f"Last LBA={last_lba} " in out, (lun, out)


async def test_domu_through_bridge_xen_backend() -> None:
    result = await run_xen(DOM0_SCRIPT, files={"guest.sh": GUEST_SCRIPT, "bridge.py": BRIDGE_SCRIPT},
                           timeout=2400)
    script = result.script_output
    guest = result.domu_console("domu")
    steps = _steps(script)
    print(f"xen bridge cycle: {result.seconds:.1f} s wall; dom0 steps: {steps}")
    for line in re.findall(r"^GUEST (?:fio rc|t=).*$", guest, re.M):
        print(line)
    assert "VSCSI-XEN-DOM0-READY" in result.output, result.describe()
    assert result.rc == 0, result.describe()

    # (1) exactly LUNs 0 and 1; LUN 2 (another initiator's) refused by the backend.
    assert "GUEST boot 1" in guest, result.describe()
    assert "GUEST luns: 0 1\n" in guest, result.describe()
    assert re.search(r"refused \(v-dev 0:0:0:2, LUN 2 not mapped", script), script[-6000:]
    assert SERIAL_OTHER not in guest
    _check_lun(guest, 0, SERIAL0, WWN0, SIZES_MIB["disk0"] * 2048 - 1, result)
    _check_lun(guest, 1, SERIAL1, WWN1, SIZES_MIB["disk1"] * 2048 - 1, result)
    assert _reported_luns(_lines(guest, "RL1 ")) == {0, 1}, _lines(guest, "RL1 ")
    assert f"GUEST lun1 data: {PATTERN1}" in guest

    # (2) fio verify=crc32c with 256 KiB requests: beyond VSCSIIF_SG_TABLESIZE, so SG_GRANT.
    fio = _lines(guest, "FIO ")
    assert "GUEST fio rc=0" in guest, fio
    assert re.search(r"err=\s*0", fio), fio
    # fio counts the verify pass as reads of the written blocks.
    assert re.search(r"^\s*write: IOPS=", fio, re.M) and re.search(r"^\s*read: IOPS=", fio, re.M), fio
    stats_m = re.findall(r"^CTL stats: ok (\{.*\})$", script, re.M)
    assert stats_m, script[-6000:]
    stats = json.loads(stats_m[-1])
    assert stats["max_bytes"] >= 256 << 10, stats
    assert stats["beyond_sg_tablesize"] >= 128, stats  # 64 writes + 64 verify reads at least

    # (4) sg_reset -d: RESET -> LOGICAL UNIT RESET, answered with success.
    assert "GUEST sg_reset rc=0" in guest, _lines(guest, "RESET ")
    assert stats["tmfs"].get("LOGICAL_UNIT_RESET:FUNCTION_COMPLETE", 0) >= 1, stats
    assert "GUEST read after reset ok" in guest

    # (4b) PR fencing between the domU and the dom0 initiator on LU disk0.
    assert re.search(r"^GUEST pr register rc=0 ", guest, re.M), result.describe()
    assert f"CTL pr out 6 0 0 {FENCER_KEY}: ok status=0x00" in script, script[-6000:]
    assert re.search(r"^GUEST pr reserve rc=0 ", guest, re.M), result.describe()
    prs = _lines(guest, "PRS ")
    assert INITIATOR in prs and FENCER in prs, prs
    assert re.search(r"reservation holder", prs, re.I), prs
    assert re.search(r"write exclusive, registrants only", prs, re.I), prs
    assert f"CTL pr out 5 5 {FENCER_KEY} {DOMU_KEY}: ok status=0x00" in script, script[-6000:]
    assert f"CTL pr in 1: ok status=0x00 sense= reservation key={FENCER_KEY} type=5" in script
    assert f"CTL pr in 0: ok status=0x00 sense= keys={FENCER_KEY}\n" in script, script[-6000:]
    assert re.search(r"registrations preempted", _lines(guest, "PRUA "), re.I), _lines(guest, "PRUA ")
    fenced = re.search(r"^GUEST pr fenced write (\w+)(.*)$", guest, re.M)
    assert fenced and fenced.group(1) == "failed", result.describe()
    conflicts = re.search(r"^GUEST pr fenced dmesg conflicts: (\d+)", guest, re.M)
    # BLK_STS_NEXUS (RESERVATION CONFLICT) surfaces as EBADE "Invalid exchange".
    assert (conflicts and int(conflicts.group(1)) >= 1) or "invalid exchange" in fenced.group(2).lower(), \
        (fenced.group(0), conflicts)
    assert "GUEST pr fenced read ok" in guest, result.describe()
    assert f"CTL pr out 3 0 {FENCER_KEY} 0: ok status=0x00" in script, script[-6000:]
    assert "GUEST pr cleared" in guest, result.describe()

    # (3) hotplug: LUN 2 added, then LUN 1 removed, while the domU runs.
    assert "CTL map 2 disk2: ok" in script and "CTL unmap 1: ok" in script, script[-6000:]
    assert "GUEST luns after add: 0 1 2" in guest, result.describe()
    _check_lun(guest, 2, SERIAL2, None, SIZES_MIB["disk2"] * 2048 - 1, result)
    assert f"GUEST lun2 data: {PATTERN2}" in guest
    assert "GUEST luns after remove: 0 2" in guest, result.describe()
    assert _reported_luns(_lines(guest, "RL2 ")) == {0, 2}, _lines(guest, "RL2 ")

    # (5) reboot: a new domain, attached again, the data written before is intact.
    if not WITH_REBOOT:
        return
    md5 = re.search(r"^GUEST reboot data md5=([0-9a-f]{32})$", guest, re.M)
    assert md5, result.describe()
    assert "GUEST boot 2" in guest, result.describe()
    assert "GUEST luns after reboot: 0 2" in guest, result.describe()
    assert f"GUEST reboot data: want {md5.group(1)} got {md5.group(1)}" in guest, result.describe()
    assert "GUEST fio verify_only rc=0" in guest, _lines(guest, "FIO2 ")
    assert "VSCSI-DOMU-RC=0" in guest, result.describe()
