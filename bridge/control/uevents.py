"""Following block-device backings: kernel uevents (pyroute2's parser) and sysfs traits.

An LU backed by a block device (a LVM volume, a loop device, a SAN LUN) changes size
when the device does (``lvextend``, ``losetup -c``, a rescan); the kernel then sends a
``change`` uevent with ``RESIZE=1`` (block/genhd.c set_capacity_and_notify). The watcher
listens on the kernel's uevent netlink group and calls ``Target.resize`` for the LU,
so its guests get CAPACITY DATA HAS CHANGED and the virtio PARAM_CHANGE event, as with
``lu.resize``. A ``remove`` uevent of a backing device (a SAN LUN deleted, a disk
pulled) takes the LU off every LUN map it is on, as a hot-unplug: KVM guests get the
virtio-scsi TRANSPORT_RESET REMOVED event and Xen guests Reconfiguring, so their disk
goes away instead of failing every I/O on a dead descriptor; the LU stays listed
(``status`` shows it under block_devices.removed, with the LUNs it had) until
``lu.remove``, and the device can be added again (``lu.add``) when it is back.

I/O stays with trio (an AF_NETLINK socket); parsing is pyroute2's ``MarshalUevent``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket as stdsocket
import stat
import struct
from typing import Any

import trio

from bridge.scsi.device_traits import device_traits
from bridge.scsi.target import Target

log = logging.getLogger(__name__)

NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1


def parse_uevent(data: bytes) -> dict[str, str]:
    """A kernel (or udev) uevent datagram -> its properties (ACTION, DEVNAME, MAJOR, ...)."""
    from pyroute2.netlink.uevent import MarshalUevent

    try:
        for msg in MarshalUevent().parse(data):
            return {k: v for k, v in msg.items() if isinstance(k, str) and isinstance(v, str)}
    except (UnicodeDecodeError, ValueError, struct.error):
        pass  # only the kernel sends to this group; still, never fail on a datagram
    return {}


def device_number(path: str) -> int | None:
    """st_rdev of a block device, None for anything else."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def block_traits(path: str) -> dict[str, Any] | None:
    """The sysfs traits of a block device (bridge/scsi/device_traits.py), None for an
    image file or a path that cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        traits = device_traits(fd)
    finally:
        os.close(fd)
    return None if traits is None else dataclasses.asdict(traits)


class BlockDeviceWatcher:
    """Resizes LUs whose backing block device changed size; remembers removed devices."""

    def __init__(self, target: Target) -> None:
        self.target = target
        # LU name -> {"device": name, "luns": [[initiator, LUN], ...]} once its device is gone
        self.removed: dict[str, dict[str, Any]] = {}
        self.resized = 0
        self.running = False

    def handle(self, event: dict[str, str]) -> None:
        if event.get("SUBSYSTEM") != "block" or "MAJOR" not in event or "MINOR" not in event:
            return
        try:
            rdev = os.makedev(int(event["MAJOR"]), int(event["MINOR"]))
        except ValueError:
            return
        action = event.get("ACTION")
        for lu in self.target.logical_units():
            if not lu.backing.is_block_device or os.fstat(lu.backing.fd).st_rdev != rdev:
                continue
            if action == "remove":
                self._removed(lu.name, event.get("DEVNAME", "?"))
            elif action == "change":
                self._refresh(lu.name)

    def _removed(self, name: str, device: str) -> None:
        """Hot-unplug the LU everywhere it is mapped (SAM-5: the logical unit is gone)."""
        nexuses = self.target.nexuses_of(name)
        for initiator, lun in nexuses:
            self.target.unmap_lun(initiator, lun)
        self.removed[name] = {"device": device, "luns": [list(n) for n in nexuses]}
        log.error("LU %s: its block device %s was removed; unmapped from %d LUN(s) "
                  "(lu.remove it, and lu.add it again when the device is back)",
                  name, device, len(nexuses))

    def _refresh(self, name: str) -> None:
        lu = self.target.logical_unit(name)
        old = lu.backing.size
        lu.backing.refresh_size()
        new = lu.backing.size
        if new == old:
            return
        if new % lu.block_size or new < lu.block_size:
            log.error("LU %s: device is now %d bytes, not a multiple of %d; not resized",
                      name, new, lu.block_size)
            return
        self.target.resize(name, new)
        self.resized += 1
        log.info("LU %s: block device resized from %d to %d bytes", name, old, new)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen to kernel uevents until cancelled; without netlink access, say so and end."""
        try:
            sock = trio.socket.socket(stdsocket.AF_NETLINK, stdsocket.SOCK_RAW, NETLINK_KOBJECT_UEVENT)
        except OSError as e:
            log.info("no kernel uevents (%s): block-device LUs are not resized automatically", e)
            task_status.started()
            return
        with sock:
            try:
                await sock.bind((0, KERNEL_GROUP))
                sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_RCVBUF, 1 << 20)
            except OSError as e:
                log.info("no kernel uevents (%s): block-device LUs are not resized automatically", e)
                task_status.started()
                return
            self.running = True
            task_status.started()
            try:
                while True:
                    try:
                        data = await sock.recv(65536)
                    except OSError as e:  # ENOBUFS: events were lost; look at every device
                        log.warning("uevent socket: %s; re-reading block device sizes", e)
                        for lu in self.target.logical_units():
                            if lu.backing.is_block_device:
                                self._refresh(lu.name)
                        continue
                    try:
                        self.handle(parse_uevent(data))
                    except Exception:
                        log.exception("uevent handling failed")
            finally:
                self.running = False
