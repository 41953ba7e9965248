"""Persistent reservations across target ports, two booted KVM guests with two paths each.

One LU ``shared``; guest 1 (initiator G1) through relative target ports 1 and 2, guest 2
(G2) through ports 3 and 4 (four vfio-user attachments, a port group each). With
``sg_persist`` in the guests:

- guest 1 registers with ALL_TG_PT through port 1: READ FULL STATUS (read through its other
  path) lists the key for both its initiator ports (ISIDs 1 and 2, one per path) with the
  ALL_TG_PT bit; guest 2 registers through port 3 only (relative port 3 reported);
- guest 1 reserves (Write Exclusive) through port 1; guest 2 PREEMPT AND ABORTs guest 1's
  key: both of guest 1's paths lose the registration and get REGISTRATIONS PREEMPTED;
- guest 2 moves the reservation with REGISTER AND MOVE to its other port (4), named by its
  initiator name and relative target port 4.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import trio

from bridge.control.pytest_plugin import start_bridge
from harness.guest import guest_session, run_ok

G1 = "iqn.2026-11.org.example:pr-g1"
G2 = "iqn.2026-11.org.example:pr-g2"
CONFIG = {
    "bridge": {"log_level": "info"},
    "lu": [{"name": "shared", "path": "shared.img", "size": "16MiB"}],
    "vfio_user": [
        {"socket": "g1a.sock", "initiator": G1, "luns": {"0": "shared"}},
        {"socket": "g1b.sock", "initiator": G1, "luns": {"0": "shared"}},
        {"socket": "g2a.sock", "initiator": G2, "luns": {"0": "shared"}},
        {"socket": "g2b.sock", "initiator": G2, "luns": {"0": "shared"}},
    ],
}


async def sg_by_port(g) -> dict[int, str]:
    """Relative target port -> the guest's sg device (from page 83h)."""
    out = await run_ok(g, "vscsi_lsscsi")
    ports = {}
    for sg in re.findall(r" /dev/(sg\d+) ", out):
        di = await run_ok(g, f"sg_vpd -p di /dev/{sg}")
        ports[int(re.search(r"Relative target port: 0x(\w+)", di).group(1), 16)] = sg
    return ports


def full_status(text: str) -> list[tuple[int, bool, bool, int, str]]:
    """sg_persist --read-full-status: (key, ALL_TG_PT, holder, relative port, TransportID
    name) per descriptor. sg_persist prints no relative port when ALL_TG_PT is set (its
    value is then undefined, SPC-4 6.15.5): 0 here."""
    out = []
    for block in re.split(r"\n\s*Key=", text)[1:]:
        key = int(block.split()[0], 16)
        rtpi = re.search(r"Relative port address: 0x(\w+)", block)
        tid = re.search(r"iSCSI .*?: (\S+)", block)
        out.append((key, "All target ports bit set" in block,
                     "<< Reservation holder >>" in block, int(rtpi.group(1), 16) if rtpi else 0,
                     tid.group(1) if tid else ""))
    return out


def pr(sg: str, args: str) -> str:
    return f"sg_persist -n {args} /dev/{sg}"


@pytest.mark.booted
async def test_reservations_across_ports_two_guests(run_dir: Path) -> None:
    bridge = await trio.to_thread.run_sync(start_bridge, run_dir, CONFIG)

    def second(sock: str) -> list[str]:
        return ["-device", json.dumps({"driver": "vfio-user-pci", "id": "vscsi1",
                                       "socket": {"path": bridge.socket(sock), "type": "unix"}})]
    try:
        async with guest_session(attach="vfio-user", socket=bridge.socket("g1a.sock"),
                                 extra_args=second("g1b.sock"), boot_timeout=300) as g1, \
                guest_session(attach="vfio-user", socket=bridge.socket("g2a.sock"),
                              extra_args=second("g2b.sock"), boot_timeout=300) as g2:
            p1, p2 = await sg_by_port(g1), await sg_by_port(g2)
            assert sorted(p1) == [1, 2] and sorted(p2) == [3, 4], (p1, p2)

            await run_ok(g1, pr(p1[1], "--out --register --param-sark=1 --param-alltgpt"),
                         prompt="guest1#")
            await run_ok(g2, pr(p2[3], "--out --register --param-sark=2"), prompt="guest2#")
            st = full_status(await run_ok(g1, pr(p1[2], "--in --read-full-status"),
                                          prompt="guest1#"))
            assert sorted(st) == [(1, True, False, 0, f"{G1},i,0x000000000001"),
                                  (1, True, False, 0, f"{G1},i,0x000000000002"),
                                  (2, False, False, 3, f"{G2},i,0x000000000001")], st

            await run_ok(g1, pr(p1[1], "--out --reserve --param-rk=1 --prout-type=1"),
                         prompt="guest1#")
            st = full_status(await run_ok(g2, pr(p2[4], "--in --read-full-status"),
                                          prompt="guest2#"))
            assert (1, True, True, 0, f"{G1},i,0x000000000001") in st, st

            # PREEMPT AND ABORT from guest 2 through port 3: guest 1's key goes on both ports.
            await run_ok(g2, pr(p2[3], "--out --preempt-abort --param-rk=2 --param-sark=1 "
                                       "--prout-type=1"), prompt="guest2#")
            for rtpi in (1, 2):
                r = await g1.run(f"sg_turs -v /dev/{p1[rtpi]}")
                print(f"guest1# sg_turs -v /dev/{p1[rtpi]}\n{r.output}(rc={r.rc})")
                assert r.rc != 0 and re.search(r"[Rr]egistrations preempted", r.output), r.output
            st = full_status(await run_ok(g1, pr(p1[2], "--in --read-full-status"),
                                          prompt="guest1#"))
            assert st == [(2, False, True, 3, f"{G2},i,0x000000000001")], st

            # REGISTER AND MOVE: guest 2's reservation to its own port 4.
            await run_ok(g2, pr(p2[3], f"--out --register-move --param-rk=2 --param-sark=22 "
                                       f"--relative-target-port=4 --transport-id={G2}"),
                         prompt="guest2#")
            st = full_status(await run_ok(g2, pr(p2[4], "--in --read-full-status"),
                                          prompt="guest2#"))
            assert sorted(st) == [(2, False, False, 3, f"{G2},i,0x000000000001"),
                                  (0x22, False, True, 4, f"{G2},i,0x000000000002")], st
            shown = json.loads(bridge.cli("pr", "show", "--json", check=True).stdout)
            print(json.dumps(shown, indent=1))
    finally:
        code = await trio.to_thread.run_sync(bridge.stop)
        print(bridge.log()[-2000:])
    assert code == 0
