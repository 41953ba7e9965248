"""ALUA and dm-multipath in a booted KVM guest, driven from outside through the control CLI.

``vscsi-bridge serve`` serves one LU through two vfio-user attachments of one guest (one
initiator name, two initiator ports), each a target port in a port group of its own:
``left`` (relative port 1, active/optimized) and ``right`` (relative port 2,
active/non-optimized). The guest (scsi_dh_alua, udevd, multipathd) assembles one
dm-multipath device with ALUA priorities. fio writes and verifies (crc32c) on it in a loop
while the control plane:

a) swaps the states: ``left`` standby, ``right`` active/optimized;
b) makes the active group (``right``) unavailable: the guest fails over to ``left``, whose
   standby scsi_dh_alua turns active/optimized with its own SET TARGET PORT GROUPS;
c) brings ``right`` back (active/non-optimized), then takes the active port (1) down, as a
   failed link: I/O goes on through port 2 (whose scsi_dh_alua makes ``right``
   active/optimized with SET TARGET PORT GROUPS);
d) brings everything back: port 1 up, ``left`` active/optimized, ``right``
   active/non-optimized; with ``failback immediate`` the I/O returns to port 1.

After that ``sg_stpg`` from the guest sets ``right`` to standby (checked through
``alua show``), and every fio run must have ended with no I/O error and a clean verify.
The guest's sg_rtpg, sg_vpd -p di and multipath -ll outputs are printed (the README's
transcript comes from here).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import trio

from bridge.control.pytest_plugin import RunningBridge, start_bridge
from harness.guest import REPO, guest_session, run_ok

INI = "iqn.2026-11.org.example:mpguest"
CONFIG = {
    "bridge": {"log_level": "info"},
    "lu": [{"name": "disk0", "path": "disk0.img", "size": "64MiB"}],
    "port_group": [{"name": "left", "id": 1, "state": "active/optimized"},
                   {"name": "right", "id": 2, "state": "active/non-optimized"}],
    "vfio_user": [
        {"socket": "p1.sock", "initiator": INI, "port_group": "left", "luns": {"0": "disk0"}},
        {"socket": "p2.sock", "initiator": INI, "port_group": "right", "luns": {"0": "disk0"}},
    ],
}
MODULES = "dm-multipath,dm-service-time,dm-round-robin,scsi_dh_alua"
MULTIPATH_CONF = """defaults {
    user_friendly_names yes
    find_multipaths no
    polling_interval 2
    failback immediate
    no_path_retry 15
}
"""
# fio writes 16 MiB at random and verifies every block (crc32c) as it goes, again and
# again until /tmp/stop exists; each run's result is kept.
FIO_LOOP = (
    "( n=0; while [ ! -e /tmp/stop ]; do n=$((n+1)); "
    "fio --name=mp$n --filename=/dev/mapper/mpatha --direct=1 --ioengine=libaio --iodepth=8 "
    "--rw=randwrite --bs=4k --size=16M --verify=crc32c --verify_backlog=256 --verify_fatal=1 "
    "--randrepeat=0 >/tmp/fio.$n.out 2>&1; echo \"run $n rc=$?\" >>/tmp/fio.runs; done; "
    "touch /tmp/fio.done ) </dev/null >/dev/null 2>&1 &"
)


async def cli(bridge: RunningBridge, *args: str) -> str:
    proc = await trio.run_process([sys.executable, "-m", "bridge.cli", *args, "--socket",
                                   bridge.control_socket], capture_stdout=True,
                                  capture_stderr=True, check=False, cwd=REPO)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    out = proc.stdout.decode()
    print(f"host$ vscsi-bridge {' '.join(args)}\n{out}")
    return out


def paths(show_paths: str) -> dict[str, tuple[int, str, str]]:
    """``multipathd show paths``: dev -> (prio, dm state, checker state)."""
    out = {}
    for line in show_paths.splitlines():
        f = line.split()
        if len(f) >= 6 and re.fullmatch(r"sd[a-z]+", f[1]):
            out[f[1]] = (int(f[3]), f[4], f[5])
    return out


def active_group_dev(ll: str) -> str | None:
    """The device of the path group multipath -ll shows as status=active."""
    lines = ll.splitlines()
    for i, line in enumerate(lines):
        if "status=active" in line and i + 1 < len(lines):
            m = re.search(r"\d+:\d+:\d+:\d+ (sd[a-z]+)", lines[i + 1])
            if m:
                return m.group(1)
    return None


async def wait_paths(g, want, what: str, seconds: int = 90) -> str:
    """Poll multipathd until ``want(paths, ll)`` holds; the last multipath -ll output."""
    last = ""
    for _ in range(seconds // 2):
        r = await g.run("multipathd show paths; echo ===; multipath -ll", timeout=60)
        sp, _, ll = r.output.partition("===")
        last = r.output
        if want(paths(sp), ll):
            print(f"[{what}]\n{r.output}")
            return ll
        await trio.sleep(2)
    raise AssertionError(f"multipathd never showed: {what}\n{last}")


@pytest.mark.booted
async def test_alua_failover_with_fio_verify(run_dir: Path) -> None:
    bridge = await trio.to_thread.run_sync(start_bridge, run_dir, CONFIG)
    try:
        dev2 = json.dumps({"driver": "vfio-user-pci", "id": "vscsi1",
                           "socket": {"path": bridge.socket("p2.sock"), "type": "unix"}})
        async with guest_session(attach="vfio-user", socket=bridge.socket("p1.sock"), fio=True,
                                 append=f"vscsi.modules={MODULES}",
                                 extra_args=["-device", dev2], boot_timeout=300) as g:
            lsscsi = await run_ok(g, "vscsi_lsscsi")
            devs = re.findall(r"^\[\d+:0:0:0\] .* /dev/(sd[a-z]+) /dev/(sg\d+) ", lsscsi, re.MULTILINE)
            assert len(devs) == 2, lsscsi
            # Which SCSI device is which target port: the relative port its page 83h names.
            port_dev: dict[int, tuple[str, str]] = {}
            for sd, sg in devs:
                di = await run_ok(g, f"sg_vpd -p di /dev/{sg}", prompt="guest#")
                rtpi = int(re.search(r"Relative target port: 0x(\w+)", di).group(1), 16)
                assert f"Target port group: 0x{rtpi}" in di, di  # one group per port here
                assert f"target,t,0x000{rtpi}" in di, di
                port_dev[rtpi] = (sd, sg)
            assert sorted(port_dev) == [1, 2], port_dev
            (d1, _sg1), (d2, sg2) = port_dev[1], port_dev[2]
            rtpg = await run_ok(g, f"sg_rtpg -d /dev/{sg2}", prompt="guest#")
            groups = re.findall(r"target port group id : 0x(\w+) .*?asymmetric access state : "
                                r"0x(\w+).*?Relative target port ids:\s+0x(\w+)", rtpg, re.S)
            assert [(int(a, 16), int(b, 16), int(c, 16)) for a, b, c in groups] == \
                [(1, 0, 1), (2, 1, 2)], rtpg

            await run_ok(g, "/lib/systemd/systemd-udevd --daemon; udevadm trigger --action=add;"
                            " udevadm settle -t 30", timeout=90)
            await run_ok(g, f"cat >/etc/multipath.conf <<'EOF'\n{MULTIPATH_CONF}EOF\n"
                            "multipathd -s >/tmp/multipathd.log 2>&1 &\n"
                            "n=0; until [ -e /dev/mapper/mpatha ]; do n=$((n+1)); [ $n -gt 60 ] "
                            "&& exit 1; sleep 1; done", timeout=120)
            await run_ok(g, "dd if=/dev/mapper/mpatha of=/dev/null bs=64k count=4 iflag=direct")
            ll = await wait_paths(
                g, lambda p, ll: p.get(d1, (0,))[0] == 50 and p.get(d2, (0,))[0] == 10
                and active_group_dev(ll) == d1, "one device, two paths, optimized path active")
            assert ll.count("mpatha (") == 1 and "hwhandler='1 alua'" in ll, ll

            await run_ok(g, FIO_LOOP)

            async def fio_runs() -> int:
                r = await g.run("cat /tmp/fio.runs 2>/dev/null | wc -l")
                return int(r.output.strip() or 0)

            # a) swap: left standby, right active/optimized.
            await cli(bridge, "alua", "set", "left", "standby")
            await cli(bridge, "alua", "set", "right", "active/optimized")
            await wait_paths(g, lambda p, ll: p.get(d2, (0,))[0] == 50
                             and p.get(d1, (0, "", ""))[2] == "ghost"
                             and active_group_dev(ll) == d2, "a) right optimized, left standby")

            # b) the active group unavailable: failover to left; the guest's STPG makes it A/O.
            await cli(bridge, "alua", "set", "right", "unavailable")
            await wait_paths(g, lambda p, ll: p.get(d1, (0, "", ""))[1:] == ("active", "ready")
                             and p.get(d2, (0, "", ""))[1] == "failed"
                             and active_group_dev(ll) == d1, "b) failover to left")
            shown = json.loads(await cli(bridge, "alua", "show", "--json"))
            left = next(x for x in shown["groups"] if x["name"] == "left")
            assert left["state"] == "active/optimized" and left["status"] == 1, left  # by STPG

            # c) right back, then the active port down (a failed link).
            await cli(bridge, "alua", "set", "right", "active/non-optimized")
            await wait_paths(g, lambda p, ll: p.get(d2, (0, "", ""))[1:] == ("active", "ready"),
                             "c) right usable again")
            before = await fio_runs()
            await cli(bridge, "port", "down", "1")
            await wait_paths(g, lambda p, ll: p.get(d1, (0, "", ""))[1] == "failed"
                             and active_group_dev(ll) == d2, "c) port 1 down, I/O on port 2")

            # d) failback: everything back as configured (the guest's own STPG made right
            # active/optimized when port 1 failed).
            await cli(bridge, "port", "up", "1")
            await cli(bridge, "alua", "set", "left", "active/optimized")
            await cli(bridge, "alua", "set", "right", "active/non-optimized")
            await wait_paths(g, lambda p, ll: p.get(d1, (0, "", ""))[:2] == (50, "active")
                             and p.get(d2, (0, "", ""))[:2] == (10, "active")
                             and active_group_dev(ll) == d1, "d) failback to left")
            assert await fio_runs() > before, "fio made no progress across the port failure"

            await run_ok(g, "touch /tmp/stop; n=0; until [ -e /tmp/fio.done ]; do n=$((n+1)); "
                            "[ $n -gt 300 ] && exit 1; sleep 1; done", timeout=400)
            runs = await run_ok(g, "cat /tmp/fio.runs")
            outs = await run_ok(g, "cat /tmp/fio.*.out")
            assert runs.count("rc=0") == len(runs.strip().splitlines()) >= 3, runs + outs
            assert "err= 0" in outs and not re.search(r"err=\s*[1-9]", outs), outs
            assert not re.search(r"verify.*(bad|fail)", outs, re.I), outs

            # sg_stpg from the guest is honoured: right (through port 2) to standby.
            await run_ok(g, f"sg_stpg --standby /dev/{sg2}; sg_rtpg -d /dev/{sg2}", prompt="guest#")
            shown = json.loads(await cli(bridge, "alua", "show", "--json"))
            right = next(x for x in shown["groups"] if x["name"] == "right")
            assert (right["state"], right["status"]) == ("standby", 1), right
            await run_ok(g, f"sg_vpd -p di /dev/{sg2}; multipath -ll", prompt="guest#")
            log = await g.run("tail -n 40 /tmp/multipathd.log")
            print(log.output)
    finally:
        code = await trio.to_thread.run_sync(bridge.stop)
        print(bridge.log()[-3000:])
    assert code == 0
