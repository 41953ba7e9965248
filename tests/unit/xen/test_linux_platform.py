"""Parts of the real /dev/xen platform that can run without Xen: pending-port handling
of /dev/xen/evtchn (read pending ports, write them back to unmask) over a stand-in fd,
and the ioctl argument layouts."""

import os
import socket
import struct

import trio

from bridge.xen import linux_platform as lp


async def test_evtchn_wait_reads_pending_and_unmasks():
    driver, ours = socket.socketpair()
    ours.setblocking(False)
    port = lp.EvtchnPort(ours.fileno(), 9)
    with trio.fail_after(2):
        async with trio.open_nursery() as n:
            done = trio.Event()

            async def waiter():
                await port.wait()
                done.set()

            n.start_soon(waiter)
            await trio.sleep(0.01)
            assert not done.is_set()  # nothing pending yet
            driver.send(struct.pack("<II", 9, 9))  # the driver delivered port 9 (twice)
            await done.wait()
    driver.settimeout(1)
    assert driver.recv(64) == struct.pack("<II", 9, 9)  # written back: unmasked
    port.fd = -1  # not a real evtchn fd: nothing to unbind
    driver.close()
    ours.close()


def test_map_grant_ref_argument_layout():
    # What GntdevGrants.map hands to IOCTL_GNTDEV_MAP_GRANT_REF for two refs of dom 5.
    arg = lp.MAP_GRANT_REF.pack(2, 0, 0) + lp.GRANT_REF.pack(5, 100) + lp.GRANT_REF.pack(5, 101)
    assert len(arg) == 32
    assert struct.unpack_from("<IIQIIII", arg) == (2, 0, 0, 5, 100, 5, 101)
    assert lp.IOCTL_GNTDEV_MAP_GRANT_REF == 0x184700  # seen working on x86-64 dom0
    assert lp.IOCTL_EVTCHN_BIND_INTERDOMAIN == 0x84501
    assert lp.IOCTL_EVTCHN_NOTIFY == 0x44504


def test_gntdev_absent_is_an_oserror():
    missing = "/nonexistent/gntdev"
    assert not os.path.exists(missing)
    try:
        lp.GntdevGrants(missing)
    except OSError:
        pass
    else:
        raise AssertionError("opening a missing gntdev must fail")
