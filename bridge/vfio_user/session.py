"""One client's vfio-user command handling, sans-I/O.

``Session.handle`` takes a decoded message and returns the reply to send (or
None), after acting on the device and the DMA space. Every refusal is an
error reply with an errno; nothing a client sends raises out of here. The
trio transport around it lives in server.py.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field

from bridge.ratelimit import RateLimitedLog
from bridge.vfio_user import protocol as p
from bridge.vfio_user.budget import MAX_DMA_MAPS, ConnectionBudget, connection_budget
from bridge.vfio_user.device import (
    IRQ_INFO_EVENTFD,
    REGION_FLAG_MMAP,
    REGION_FLAG_READ,
    REGION_FLAG_WRITE,
    RegionInfo,
    VfioUserDevice,
)
from bridge.vfio_user.dma import DmaMapError, DmaSpaceImpl
from bridge.vfio_user.fds import check_eventfd, check_sealed_memory

log = logging.getLogger("bridge.vfio_user")

MAX_DATA_XFER_SIZE = 1 << 20  # what we accept in one message's data (QEMU default)
PGSIZES = 4096
# Room above max_data_xfer_size for headers and fixed fields (WRITE_MULTI is < 5 KiB).
MESSAGE_HEADROOM = 64 * 1024
MAX_MESSAGE_SIZE = MAX_DATA_XFER_SIZE + MESSAGE_HEADROOM
# Largest DMA_READ/DMA_WRITE we ask of the client. QEMU 11.1 sends a reply
# with one non-blocking writev and treats a short write as complete
# (proxy.c vfio_user_send_qio), so a reply larger than its socket send buffer
# (wmem_default, 208 KiB here) arrives truncated and breaks the stream: a
# 1 MiB DMA_READ was seen to hang. Keep transfers well below that.
DMA_TRANSFER_CHUNK = 64 * 1024


# The only commands that carry file descriptors (vfio-user.rst).
_FD_COMMANDS = {p.Command.DMA_MAP, p.Command.DEVICE_SET_IRQS}


@dataclass(slots=True)
class Outgoing:
    data: bytes
    fds: list[int] = field(default_factory=list)  # sent, not given away


@dataclass
class ClientCaps:
    """What the client said it accepts (VERSION), used for messages we send it."""

    max_msg_fds: int = 1
    max_data_xfer_size: int = MAX_DATA_XFER_SIZE
    write_multiple: bool = False


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass
class ClientLogs:
    """What clients of one socket can make us log, each kind rate-limited on its own.

    One per socket, shared by its successive connections: one guest's flood
    does not silence another's, and reconnecting resets nothing.
    """

    # refused messages: 20 lines at once, then 1 a second
    refusals: RateLimitedLog = field(
        default_factory=lambda: RateLimitedLog(log, burst=20, period=20.0))
    # lines every connection logs (connected, VERSION, disconnected): 20, then 1 in 3 s
    lifecycle: RateLimitedLog = field(
        default_factory=lambda: RateLimitedLog(log, burst=20, period=60.0))
    # why the server closed a connection: 20, then 1 in 3 s
    closes: RateLimitedLog = field(
        default_factory=lambda: RateLimitedLog(log, burst=20, period=60.0))


class Session:
    def __init__(self, device: VfioUserDevice, dma: DmaSpaceImpl, *,
                 budget: ConnectionBudget | None = None,
                 logs: ClientLogs | None = None) -> None:
        self.device = device
        self.dma = dma
        self.budget = budget if budget is not None else connection_budget(1)
        self.logs = logs if logs is not None else ClientLogs()
        # The IRQ eventfds the device keeps come out of the same fd budget.
        irq_fds = sum(irq.count for irq in device.irqs() if irq.flags & IRQ_INFO_EVENTFD)
        dma.max_maps = min(dma.max_maps, self.budget.dma_maps)
        dma.max_fd_maps = max(1, self.budget.pinned_fds - irq_fds)
        dma.max_mapped_bytes = self.budget.mapped_bytes
        self.negotiated = False
        self.client = ClientCaps()
        # Counters for tests and the log; cheap.
        self.stats: dict[int | str, int] = {}  # per command number, and "errors"
        # regions() is read once per client (on first use): PCI regions do not
        # change while a client is connected.
        self._regions: list[RegionInfo] | None = None
        self._handlers = {
            p.Command.VERSION: self._version,
            p.Command.DMA_MAP: self._dma_map,
            p.Command.DMA_UNMAP: self._dma_unmap,
            p.Command.DEVICE_GET_INFO: self._device_info,
            p.Command.DEVICE_GET_REGION_INFO: self._region_info,
            p.Command.DEVICE_GET_IRQ_INFO: self._irq_info,
            p.Command.DEVICE_SET_IRQS: self._set_irqs,
            p.Command.REGION_READ: self._region_read,
            p.Command.REGION_WRITE: self._region_write,
            p.Command.REGION_WRITE_MULTI: self._write_multi,
            p.Command.DEVICE_RESET: self._reset,
        }
        # Known commands we deliberately do not implement.
        self._unsupported = {
            p.Command.DEVICE_GET_REGION_IO_FDS,
            p.Command.DIRTY_PAGES,
            p.Command.DEVICE_FEATURE,
            p.Command.MIG_DATA_READ,
            p.Command.MIG_DATA_WRITE,
        }

    # --- entry points -------------------------------------------------------------

    def handle(self, msg: p.Message) -> Outgoing | None:
        """Act on one client command; return its reply unless NO_REPLY was asked."""
        hdr = msg.header
        stats = self.stats
        stats[hdr.command] = stats.get(hdr.command, 0) + 1
        fds = msg.fds
        try:
            if hdr.flags & p.FLAG_TYPE_MASK != p.TYPE_COMMAND:
                raise p.ProtocolError(errno.EINVAL, f"message type {hdr.flags & 0xF:#x}")
            if msg.fds_truncated:
                raise p.ProtocolError(errno.EINVAL, "too many file descriptors")
            handler = self._handlers.get(hdr.command)  # type: ignore[call-overload]
            if handler is None:
                if hdr.command in self._unsupported:
                    raise p.ProtocolError(errno.ENOTSUP, "not supported")
                raise p.ProtocolError(errno.ENOSYS, "unknown command")
            if not self.negotiated and hdr.command != p.Command.VERSION:
                raise p.ProtocolError(errno.EINVAL, "command before VERSION")
            if hdr.command not in _FD_COMMANDS and fds:
                raise p.ProtocolError(errno.EINVAL, f"{len(fds)} unexpected file descriptors")
            fds = []  # from here the handler owns msg.fds
            reply = handler(msg)
        except p.ProtocolError as exc:
            self.logs.refusals.warning("%s (id %d): refused with %s: %s", p.command_name(hdr.command),
                                  hdr.msg_id, errno.errorcode.get(exc.errno, exc.errno), exc.reason)
            self.stats["errors"] = self.stats.get("errors", 0) + 1
            reply = Outgoing(p.encode_error(hdr, exc.errno))
        except Exception:  # a device bug must not take the server down
            self.logs.refusals.exception("%s (id %d): device failed", p.command_name(hdr.command),
                                    hdr.msg_id)
            self.stats["errors"] = self.stats.get("errors", 0) + 1
            reply = Outgoing(p.encode_error(hdr, errno.EIO))
        finally:
            _close(fds)
        if hdr.no_reply:
            return None
        return reply

    def handle_oversized(self, hdr: p.Header) -> Outgoing | None:
        self.logs.refusals.warning("%s (id %d): message of %d bytes refused with E2BIG",
                              p.command_name(hdr.command), hdr.msg_id, hdr.size)
        self.stats["errors"] = self.stats.get("errors", 0) + 1
        if hdr.no_reply:
            return None
        return Outgoing(p.encode_error(hdr, errno.E2BIG))

    # --- helpers ------------------------------------------------------------------------

    def regions(self) -> list[RegionInfo]:
        if self._regions is None:
            self._regions = list(self.device.regions())
        return self._regions

    def stats_by_name(self) -> dict[str, int]:
        return {k if isinstance(k, str) else p.command_name(k): v for k, v in self.stats.items()}

    def _region(self, index: int) -> RegionInfo:
        regions = self.regions()
        if index >= len(regions):
            raise p.ProtocolError(errno.EINVAL, f"region {index} out of range")
        return regions[index]

    def _check_access(self, acc: p.RegionAccess, need_flag: int) -> None:
        region = self._region(acc.region)
        if not region.flags & need_flag:
            raise p.ProtocolError(errno.EINVAL, f"region {acc.region} does not allow this access")
        if acc.count > MAX_DATA_XFER_SIZE:
            raise p.ProtocolError(errno.E2BIG, f"count {acc.count}")
        if acc.offset + acc.count > region.size:
            raise p.ProtocolError(
                errno.EINVAL,
                f"region {acc.region} offset {acc.offset:#x}+{acc.count} beyond size {region.size:#x}",
            )

    # --- commands ---------------------------------------------------------------------------

    def _version(self, msg: p.Message) -> Outgoing:
        if self.negotiated:
            raise p.ProtocolError(errno.EINVAL, "VERSION already negotiated")
        v = p.parse_version(msg.payload)
        if v.major != 0:
            raise p.ProtocolError(errno.ENOTSUP, f"major version {v.major}")
        caps = v.capabilities

        def num(key: str, default: int) -> int:
            value = caps.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise p.ProtocolError(errno.EINVAL, f"capability {key}={value!r}")
            return value

        client = ClientCaps(
            max_msg_fds=num("max_msg_fds", 1),
            max_data_xfer_size=num("max_data_xfer_size", MAX_DATA_XFER_SIZE),
            write_multiple=caps.get("write_multiple") is True,
        )
        pgsizes = num("pgsizes", PGSIZES)
        if not pgsizes & PGSIZES:
            raise p.ProtocolError(errno.EINVAL, f"pgsizes {pgsizes:#x} lacks 4 KiB")
        client_maps = num("max_dma_maps", MAX_DMA_MAPS)
        # Our answer: a subset of the client's offer, kept short because QEMU's
        # receive buffer is the size of its own request (proxy.c).
        ours: dict[str, object] = {
            "max_msg_fds": min(p.MAX_MSG_FDS, client.max_msg_fds) or 1,
            "max_data_xfer_size": min(MAX_DATA_XFER_SIZE, client.max_data_xfer_size) or 4096,
            "pgsizes": PGSIZES,
            "max_dma_maps": min(MAX_DMA_MAPS, client_maps) or 1,
        }
        if client.write_multiple:
            ours["write_multiple"] = True
        limit = msg.header.size
        payload = p.encode_version(0, 0, ours)
        for key in ("max_dma_maps", "pgsizes", "write_multiple", "max_data_xfer_size",
                    "max_msg_fds"):
            if p.HEADER_SIZE + len(payload) <= limit:
                break
            ours.pop(key, None)
            payload = p.encode_version(0, 0, ours)
        self.client = client
        self.dma.max_maps = min(self.budget.dma_maps,
                                int(ours.get("max_dma_maps", MAX_DMA_MAPS)))  # type: ignore[call-overload]
        self.dma.max_transfer = max(1, min(client.max_data_xfer_size, DMA_TRANSFER_CHUNK))
        self.negotiated = True
        self.logs.lifecycle.info("VERSION %d.%d negotiated: client %s, server %s", v.major, v.minor,
                            caps, ours)
        return Outgoing(p.encode_reply(msg.header, payload))

    def _dma_map(self, msg: p.Message) -> Outgoing:
        fds = msg.fds
        try:
            if len(fds) > 1:
                raise p.ProtocolError(errno.EINVAL, f"DMA_MAP with {len(fds)} fds")
            m = p.parse_dma_map(msg.payload)
            if fds:  # memory that can shrink under a mapping is a SIGBUS waiting (fds.py)
                check_sealed_memory(fds[0], m.offset, m.size)
            try:
                self.dma.map(m.address, m.size, bool(m.flags & p.DMA_MAP_FLAG_READ),
                             bool(m.flags & p.DMA_MAP_FLAG_WRITE), fds[0] if fds else None,
                             m.offset)
            except DmaMapError as exc:
                raise p.ProtocolError(exc.errno, str(exc)) from None
            log.debug("DMA_MAP %#x+%#x flags %#x offset %#x %s", m.address, m.size, m.flags,
                      m.offset, "fd" if fds else "no fd")
        finally:
            _close(fds)  # the mapping outlives the fd
        return Outgoing(p.encode_reply(msg.header))

    def _dma_unmap(self, msg: p.Message) -> Outgoing:
        u = p.parse_dma_unmap(msg.payload)
        if u.flags & p.DMA_UNMAP_FLAG_ALL:
            self.dma.unmap_all()
        else:
            try:
                self.dma.unmap(u.address, u.size)
            except DmaMapError as exc:
                raise p.ProtocolError(exc.errno, str(exc)) from None
        return Outgoing(p.encode_reply(msg.header, p.encode_dma_unmap(u)))

    def _device_info(self, msg: p.Message) -> Outgoing:
        p.parse_device_info(msg.payload)
        body = p.encode_device_info(p.DEVICE_FLAGS_PCI | p.DEVICE_FLAGS_RESET,
                                    len(self.regions()), len(self.device.irqs()))
        return Outgoing(p.encode_reply(msg.header, body))

    def _region_info(self, msg: p.Message) -> Outgoing:
        argsz, index = p.parse_argsz_index(msg.payload, p.REGION_INFO, "GET_REGION_INFO")
        region = self._region(index)
        mmap_ok = bool(region.flags & REGION_FLAG_MMAP) and region.mmap_fd is not None
        flags = region.flags if mmap_ok else region.flags & ~REGION_FLAG_MMAP
        body = p.encode_region_info(argsz, index, flags, region.size,
                                    region.mmap_offset if mmap_ok else 0,
                                    region.sparse_areas if mmap_ok else [])
        fds = [region.mmap_fd] if mmap_ok and region.mmap_fd is not None else []
        return Outgoing(p.encode_reply(msg.header, body), fds)

    def _irq_info(self, msg: p.Message) -> Outgoing:
        _argsz, index = p.parse_argsz_index(msg.payload, p.IRQ_INFO, "GET_IRQ_INFO")
        irqs = self.device.irqs()
        if index >= len(irqs):
            raise p.ProtocolError(errno.EINVAL, f"IRQ index {index} out of range")
        return Outgoing(p.encode_reply(msg.header,
                                       p.encode_irq_info(index, irqs[index].flags,
                                                         irqs[index].count)))

    def _set_irqs(self, msg: p.Message) -> Outgoing:
        fds = list(msg.fds)
        try:
            s = p.parse_irq_set(msg.payload)
            irqs = self.device.irqs()
            if s.index >= len(irqs):
                raise p.ProtocolError(errno.EINVAL, f"IRQ index {s.index} out of range")
            total = irqs[s.index].count
            if s.data_type != p.IRQ_SET_DATA_EVENTFD and fds:
                raise p.ProtocolError(errno.EINVAL, "fds without DATA_EVENTFD")
            if s.count == 0:
                if s.data_type == p.IRQ_SET_DATA_NONE and s.action == p.IRQ_SET_ACTION_TRIGGER:
                    # count 0 + DATA_NONE + TRIGGER disables the index (linux/vfio.h).
                    self.device.set_irq_eventfds(s.index, 0, [None] * total)
                    return Outgoing(p.encode_reply(msg.header))
                raise p.ProtocolError(errno.EINVAL, "count 0")
            if s.start >= total or s.count > total - s.start:
                raise p.ProtocolError(
                    errno.EINVAL, f"vectors {s.start}+{s.count} beyond {total} of index {s.index}")
            if s.data_type == p.IRQ_SET_DATA_EVENTFD:
                if s.action != p.IRQ_SET_ACTION_TRIGGER:
                    raise p.ProtocolError(errno.ENOTSUP, "eventfd for MASK/UNMASK")
                if fds and len(fds) != s.count:
                    raise p.ProtocolError(errno.EINVAL, f"{len(fds)} fds for count {s.count}")
                for fd in fds:  # eventfds only, written non-blocking (fds.py)
                    check_eventfd(fd)
                assigned: list[int | None] = list(fds) if fds else [None] * s.count
                fds = []  # the device owns them now
                self.device.set_irq_eventfds(s.index, s.start, assigned)
            elif s.action == p.IRQ_SET_ACTION_TRIGGER:
                raise p.ProtocolError(errno.ENOTSUP, "client-triggered interrupts")
            else:
                masked = s.action == p.IRQ_SET_ACTION_MASK
                if s.data_type == p.IRQ_SET_DATA_NONE:
                    self.device.set_irq_mask(s.index, s.start, s.count, masked)
                else:
                    for i in range(s.count):
                        if s.data[i]:
                            self.device.set_irq_mask(s.index, s.start + i, 1, masked)
        finally:
            _close(fds)
        return Outgoing(p.encode_reply(msg.header))

    def _region_read(self, msg: p.Message) -> Outgoing:
        acc = p.parse_region_access(msg.payload, False, "REGION_READ")
        self._check_access(acc, REGION_FLAG_READ)
        data = bytes(self.device.region_read(acc.region, acc.offset, acc.count))
        if len(data) != acc.count:
            log.error("device returned %d bytes for a %d-byte read of region %d",
                      len(data), acc.count, acc.region)
            raise p.ProtocolError(errno.EIO, "device read size mismatch")
        return Outgoing(p.encode_reply(
            msg.header, p.encode_region_access(acc.offset, acc.region, acc.count, data)))

    def _region_write(self, msg: p.Message) -> Outgoing | None:
        acc = p.parse_region_access(msg.payload, True, "REGION_WRITE")
        self._check_access(acc, REGION_FLAG_WRITE)
        self.device.region_write(acc.region, acc.offset, acc.data)
        if msg.header.no_reply:  # posted write: the common doorbell case
            return None
        return Outgoing(p.encode_reply(
            msg.header, p.encode_region_access(acc.offset, acc.region, acc.count)))

    def _write_multi(self, msg: p.Message) -> Outgoing:
        writes = p.parse_write_multi(msg.payload)
        for acc in writes:  # validate all before applying any
            self._check_access(acc, REGION_FLAG_WRITE)
        for acc in writes:
            self.device.region_write(acc.region, acc.offset, acc.data)
        if msg.header.no_reply:  # posted write: the common doorbell case
            return None
        return Outgoing(p.encode_reply(msg.header))

    def _reset(self, msg: p.Message) -> Outgoing:
        self.device.reset()
        return Outgoing(p.encode_reply(msg.header))
