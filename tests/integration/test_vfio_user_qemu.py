"""The vfio-user server against QEMU's real vfio-user-pci client (QEMU >= 10.1).

QEMU runs paused (-S) with shared memfd guest RAM; QMP query-pci must show the
dummy device's ids, and the server must have seen VERSION, DMA_MAPs with fds
and the device queries. QEMU is then restarted against the same server.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket as stdsocket
import struct
from pathlib import Path

import pytest
import trio

from bridge.vfio_user import protocol as p
from bridge.vfio_user.dma import DmaSpaceImpl
from bridge.vfio_user.server import serve
from harness import cache_dir
from tests.integration.dummy_pci import DEVICE_ID, VENDOR_ID, DummyPci

# $VSCSI_QEMU or the build of images/build-qemu.sh in $VSCSI_CACHE (harness.guest).
QEMU = str(Path(os.environ["VSCSI_QEMU"]) if os.environ.get("VSCSI_QEMU")
           else cache_dir() / "bin" / "qemu-system-x86_64")
log = logging.getLogger(__name__)


def _require_qemu() -> None:
    if not (os.path.exists(QEMU) or shutil.which(QEMU)):
        pytest.fail(f"QEMU >= 10.1 not found at {QEMU}: run `bash images/build-qemu.sh`")


class Qmp:
    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buf = b""

    async def _line(self) -> dict:
        while b"\n" not in self.buf:
            chunk = await self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    async def execute(self, command: str) -> object:
        return await self.execute_args(command, None)

    async def execute_args(self, command: str, arguments: dict | None) -> object:
        req: dict = {"execute": command}
        if arguments is not None:
            req["arguments"] = arguments
        await self.sock.send(json.dumps(req).encode() + b"\n")
        while True:
            msg = await self._line()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise RuntimeError(f"QMP {command}: {msg['error']}")


async def _connect_qmp(path: str) -> Qmp:
    with trio.fail_after(60):
        while True:
            sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
            try:
                await sock.connect(path)
                break
            except OSError:
                sock.close()
                await trio.sleep(0.1)
    qmp = Qmp(sock)
    greeting = await qmp._line()
    assert "QMP" in greeting
    await qmp.execute("qmp_capabilities")
    return qmp


PCI_SLOT = 5


def _boot_sector() -> bytes:
    """A real-mode MBR that sets Memory Space + Bus Master in our device's PCI
    command register (config mechanism #1, ports 0xCF8/0xCFC), then halts.
    Without Bus Master QEMU refuses DMA_READ/DMA_WRITE with ENODEV."""
    address = 0x80000000 | PCI_SLOT << 11 | 0x04
    code = (b"\xfa"  # cli
            + b"\x66\xb8" + struct.pack("<I", address)  # mov eax, address
            + b"\xba\xf8\x0c" + b"\x66\xef"  # mov dx, 0xcf8; out dx, eax
            + b"\xba\xfc\x0c" + b"\xed"  # mov dx, 0xcfc; in ax, dx
            + b"\x0d\x06\x00" + b"\xef"  # or ax, 6; out dx, ax
            + b"\xf4\xeb\xfd")  # hlt; jmp hlt
    return code.ljust(510, b"\0") + b"\x55\xaa"


async def _run_qemu_once(run_dir: Path, vfu_sock: str, run: int, during=None) -> list:
    qmp_path = str(run_dir / f"qmp{run}.sock")
    boot = run_dir / "boot.img"
    boot.write_bytes(_boot_sector())
    args = [
        QEMU, "-accel", "tcg", "-m", "256", "-nodefaults", "-display", "none",
        "-object", "memory-backend-memfd,id=mem0,size=256M,share=on",
        "-machine", "pc,memory-backend=mem0",
        "-device", json.dumps({"driver": "vfio-user-pci", "addr": f"{PCI_SLOT:#x}",
                               "socket": {"path": vfu_sock, "type": "unix"}}),
        "-drive", f"file={boot},format=raw,if=ide",
        "-qmp", f"unix:{qmp_path},server=on,wait=off", "-S",
    ]
    stderr_path = run_dir / f"qemu{run}.err"
    with open(stderr_path, "wb") as err:
        proc = await trio.lowlevel.open_process(args, stdin=None, stdout=err, stderr=err)
        try:
            qmp = await _connect_qmp(qmp_path)
            with trio.fail_after(60):
                buses = await qmp.execute("query-pci")
                devices = [d for bus in buses for d in bus["devices"]]  # type: ignore[union-attr]
                if during is not None:
                    await during(qmp)
                try:
                    await qmp.execute("quit")
                except EOFError:
                    pass
                await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    text = stderr_path.read_text(errors="replace")
    log.info("QEMU run %d stderr: %s", run, text.strip())
    assert proc.returncode == 0, text
    return devices


async def test_qemu_vfio_user_pci_sees_the_device_and_maps_guest_ram(run_dir: Path) -> None:
    _require_qemu()
    device = DummyPci()
    seen: list[p.Message | p.OversizedMessage] = []
    vfu_sock = str(run_dir / "vfu.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve(vfu_sock, device, trace=seen.append,
                                                      task_status=task_status))
        for run in (1, 2):  # the second run is a QEMU restart against the same server
            seen.clear()
            before = len(device.events)
            devices = await _run_qemu_once(run_dir, vfu_sock, run,
                                           lambda qmp: _check_dma(qmp, device))
            ours = [d for d in devices if d["id"]["vendor"] == VENDOR_ID]
            assert len(ours) == 1, devices
            assert ours[0]["id"]["device"] == DEVICE_ID
            with trio.fail_after(10):
                while ("detach",) not in device.events[before:]:
                    await trio.sleep(0.01)
            _check_wire(seen, device.events[before:], run)
        nursery.cancel_scope.cancel()


async def _xp(qmp: Qmp, address: int, count: int) -> bytes:
    """Guest-physical bytes as QEMU itself sees them (HMP xp)."""
    out = await qmp.execute_args("human-monitor-command",
                                 {"command-line": f"xp /{count}bx {address:#x}"})
    values = []
    for line in str(out).splitlines():
        values += [int(v, 16) for v in line.split(":", 1)[1].split()]
    return bytes(values)


def _find_bios() -> Path:
    with open(QEMU) as wrapper:  # images/build-qemu.sh wrapper names its tree in D='...'
        for line in wrapper:
            if line.startswith("D="):
                return Path(line.split("=", 1)[1].strip().strip("'\"")) / (
                    "usr/share/seabios/bios-256k.bin")
    return Path("/usr/share/seabios/bios-256k.bin")


async def _check_dma(qmp: Qmp, device: DummyPci) -> None:
    dma = device.dma
    assert isinstance(dma, DmaSpaceImpl)
    # Shared RAM: what the server writes through its mmap, QEMU reads, and back.
    dma.view(0x2000, 8, True)[:] = b"vfu-test"
    assert await _xp(qmp, 0x2000, 8) == b"vfu-test"
    # Let the boot sector enable Bus Master (QEMU forwards the command write).
    await qmp.execute("cont")
    with trio.fail_after(60):
        while not device.config[0x04] & 0x04:
            await trio.sleep(0.02)
    # The BIOS ROM at 0xfffc0000 came without an fd: DMA_READ to QEMU fetches it.
    rom = await dma.read(0xFFFFFFF0, 16)
    assert rom == await _xp(qmp, 0xFFFFFFF0, 16)
    # DMA_WRITE in QEMU's layout, aimed at RAM so the result is checkable here.
    assert dma._remote_write is not None
    await dma._remote_write(0x3000, b"dma-write")
    assert bytes(dma.view(0x3000, 9, False)) == b"dma-write"
    # The whole 256 KiB BIOS ROM by chunked DMA_READs equals SeaBIOS's image.
    rom = await dma.read(0xFFFC0000, 0x40000)
    assert dma.max_transfer < 0x40000
    bios = _find_bios()
    assert rom == bios.read_bytes(), f"ROM differs from {bios}"


def _check_wire(seen: list, events: list, run: int) -> None:
    msgs = [m for m in seen if isinstance(m, p.Message)]
    assert len(msgs) == len(seen), "QEMU sent an oversized message"
    commands = [p.command_name(m.header.command) for m in msgs]
    assert commands[0] == "VERSION"
    version = p.parse_version(msgs[0].payload)
    maps = [m for m in msgs if m.header.command == p.Command.DMA_MAP]
    with_fd = [p.parse_dma_map(m.payload) for m in maps if m.fds]
    without_fd = [p.parse_dma_map(m.payload) for m in maps if not m.fds]
    assert with_fd, "no DMA_MAP carried a file descriptor (guest RAM must be share=on memfd)"
    assert sum(m.size for m in with_fd) >= 200 << 20  # most of the 256 MiB of RAM
    assert "DEVICE_GET_INFO" in commands and "DEVICE_GET_REGION_INFO" in commands
    assert ("attach",) in events and ("detach",) in events
    # Wire facts, printed for the report (pytest -s).
    order = []
    for c in commands:
        if order and order[-1][0] == c:
            order[-1][1] += 1
        else:
            order.append([c, 1])
    print(f"\n--- QEMU run {run} ---")
    print("VERSION", version.major, version.minor, json.dumps(version.capabilities),
          "request size", msgs[0].header.size)
    print("command sequence:", " ".join(f"{c}x{n}" if n > 1 else c for c, n in order))
    for m in maps:
        d = p.parse_dma_map(m.payload)
        print(f"DMA_MAP iova={d.address:#x} size={d.size:#x} offset={d.offset:#x} "
              f"flags={d.flags} fds={len(m.fds)}")
    for m in msgs:
        if m.header.command == p.Command.DEVICE_GET_REGION_INFO:
            argsz, _f, index = struct.unpack_from("=III", m.payload)
            print(f"GET_REGION_INFO index={index} argsz={argsz}")
        elif m.header.command == p.Command.DEVICE_GET_IRQ_INFO:
            print(f"GET_IRQ_INFO index={struct.unpack_from('=III', m.payload)[2]}")
        elif m.header.command == p.Command.DEVICE_SET_IRQS:
            s = p.parse_irq_set(m.payload)
            print(f"SET_IRQS flags={s.flags:#x} index={s.index} start={s.start} "
                  f"count={s.count} fds={len(m.fds)}")
        elif m.header.command == p.Command.DMA_UNMAP:
            u = p.parse_dma_unmap(m.payload)
            print(f"DMA_UNMAP iova={u.address:#x} size={u.size:#x} flags={u.flags}")
    print("device events:", [e for e in events if e[0] != "read"][:40])
    print(f"no-fd maps: {len(without_fd)}, fd maps: {len(with_fd)}")
