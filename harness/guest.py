"""Booted-guest harness: build the images, boot a Linux guest in QEMU, run a script.

Usable from pytest (pytest-trio) and from scripts (``trio.run``)::

    result = await run_guest("sg_inq /dev/sg0", attach="vfio-user", socket=sock)
    assert result.rc == 0 and "VSCSI" in result.output

    async with guest_session(attach="vfio-user", socket=sock) as guest:
        r = await guest.run("vscsi_lsscsi")          # long-lived guest, many commands
        await guest.qmp("device_del", id="vscsi0")   # QMP, e.g. for hot-unplug

The QEMU command line comes from qemu-configs/*.args (placeholders filled in),
so the documented configuration is the tested one. The guest's /init (see
images/guest/init) prints ``VSCSI-BEGIN``, the script's output, then
``VSCSI-EXIT <rc>`` on ttyS0, and powers off.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import trio

from harness import REPO, cache_dir

IMAGES_DIR = REPO / "images"
CONFIG_DIR = REPO / "qemu-configs"
CACHE = cache_dir()

Attach = Literal["vfio-user", "builtin", "none"]
ATTACH_CONFIGS: dict[str, str | None] = {
    "vfio-user": "vfio-user.args",
    "builtin": "builtin-virtio-scsi.args",
    "none": None,
}
DEFAULT_APPEND = "console=ttyS0 panic=-1 quiet"
_EXIT_RE = re.compile(r"^VSCSI-EXIT (-?\d+)\s*$", re.MULTILINE)


class GuestError(Exception):
    """The guest did not boot, run or report as expected."""

    def __init__(self, message: str, console: str = "", log_path: Path | None = None):
        tail = "\n".join(console.splitlines()[-40:])
        where = f" (full log: {log_path})" if log_path else ""
        super().__init__(f"{message}{where}\n--- last console lines ---\n{tail}")
        self.console = console
        self.log_path = log_path


class GuestTimeout(GuestError):
    """The guest ran past its timeout; QEMU was killed."""


@dataclass(frozen=True)
class GuestImage:
    """Files produced by images/build-guest.sh."""

    directory: Path
    kernel: Path
    initramfs: Path
    fio_layer: Path


@dataclass(frozen=True)
class GuestResult:
    rc: int
    output: str  # the script's stdout+stderr (between VSCSI-BEGIN and VSCSI-EXIT)
    console: str  # everything QEMU and the guest printed
    log_path: Path
    boot_seconds: float  # QEMU start to the script's first line (VSCSI-BEGIN)
    elapsed_seconds: float  # QEMU start to QEMU exit


@dataclass(frozen=True)
class CommandResult:
    rc: int
    output: str


# --- building --------------------------------------------------------------

_build_lock = threading.Lock()


def _run_build_script(name: str) -> str:
    """Run images/<name> (idempotent, cached) and return its last stdout line."""
    proc = subprocess.run(
        ["bash", str(IMAGES_DIR / name)],
        stdout=subprocess.PIPE,
        stderr=None,  # progress lines go straight to the caller's stderr
        text=True,
        env={**os.environ, "VSCSI_CACHE": str(CACHE)},
        check=False,
    )
    if proc.returncode != 0:
        raise GuestError(f"images/{name} failed with exit status {proc.returncode}")
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise GuestError(f"images/{name} printed no result path")
    return lines[-1]


@functools.cache
def _qemu_binary_cached() -> Path:
    return Path(_run_build_script("build-qemu.sh"))


@functools.cache
def _guest_image_cached() -> GuestImage:
    d = Path(_run_build_script("build-guest.sh"))
    vmlinux = d / "vmlinux"
    return GuestImage(
        directory=d,
        kernel=vmlinux if vmlinux.exists() else d / "vmlinuz",
        initramfs=d / "initramfs.cpio.gz",
        fio_layer=d / "fio.cpio",
    )


def _override(name: str) -> Path | None:
    """The file an environment variable names instead of a built one; it must exist."""
    value = os.environ.get(name)
    if not value:
        return None
    path = Path(value)
    if not path.is_file():
        raise GuestError(f"{name}={value}: no such file")
    return path


def qemu_binary() -> Path:
    """QEMU >= 10.1 (vfio-user-pci): $VSCSI_QEMU, else the one images/build-qemu.sh builds
    (on first use). Blocking."""
    override = _override("VSCSI_QEMU")
    if override is not None:
        return override
    with _build_lock:
        return _qemu_binary_cached()


def guest_image() -> GuestImage:
    """Kernel and initramfs of the test guest: $VSCSI_KERNEL and $VSCSI_INITRD where set,
    else what images/build-guest.sh builds (on first use; not built when both are set).
    Scripts that run fio need the fio layer, $VSCSI_FIO_LAYER or the built one. Blocking."""
    kernel, initrd = _override("VSCSI_KERNEL"), _override("VSCSI_INITRD")
    fio = _override("VSCSI_FIO_LAYER")
    if kernel is not None and initrd is not None:
        return GuestImage(directory=initrd.parent, kernel=kernel, initramfs=initrd,
                          fio_layer=fio or Path("/nonexistent/VSCSI_FIO_LAYER-not-set"))
    with _build_lock:
        built = _guest_image_cached()
    return GuestImage(directory=built.directory, kernel=kernel or built.kernel,
                      initramfs=initrd or built.initramfs, fio_layer=fio or built.fio_layer)


async def ensure_images() -> tuple[Path, GuestImage]:
    """Build (or find in the cache) QEMU and the guest, off the trio thread."""
    qemu = await trio.to_thread.run_sync(qemu_binary)
    image = await trio.to_thread.run_sync(guest_image)
    return qemu, image


# --- accelerator -----------------------------------------------------------


@functools.cache
def detect_accel() -> str:
    """``kvm`` if a KVM that runs stock kernels is usable, else ``tcg,thread=multi``.

    VSCSI_ACCEL overrides. /dev/kvm backed by kvm_pvm (a PVM host) opens but
    runs only PVM-built guest kernels; a stock Debian kernel stalls or dies
    there, so PVM counts as unusable. Otherwise the guest is booted once with
    KVM and a trivial script; any failure falls back to TCG.
    """
    forced = os.environ.get("VSCSI_ACCEL")
    if forced:
        return forced
    tcg = "tcg,thread=multi"
    if Path("/sys/module/kvm_pvm").exists():
        return tcg
    if not (Path("/sys/module/kvm_intel").exists() or Path("/sys/module/kvm_amd").exists()):
        return tcg
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError:
        return tcg
    try:
        result = trio.run(
            functools.partial(run_guest, "true", attach="none", accel="kvm", timeout=30)
        )
    except (GuestError, OSError):
        return tcg
    return "kvm" if result.rc == 0 else tcg


# --- command line ----------------------------------------------------------


def load_args(name: str, values: Mapping[str, str]) -> list[str]:
    """Arguments from qemu-configs/<name>: one per line, '#' comments, @NAME@ filled in."""
    args: list[str] = []
    for raw in (CONFIG_DIR / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue

        def fill(m: re.Match[str]) -> str:
            key = m.group(1)
            if key not in values:
                raise KeyError(f"qemu-configs/{name}: no value for placeholder @{key}@")
            return values[key]

        args.append(re.sub(r"@([A-Z_]+)@", fill, line))
    return args


def newc_archive(files: Mapping[str, bytes], mode: int = 0o100755) -> bytes:
    """A cpio "newc" archive holding regular files at the given paths (no directories).

    Appended after the base initramfs, the kernel unpacks it over the same
    root (Documentation/driver-api/early-userspace/buffer-format.rst).
    """
    out = bytearray()

    def pad4() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    def entry(name: str, data: bytes, ino: int, entry_mode: int) -> None:
        encoded = name.encode() + b"\0"
        fields = (ino, entry_mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(encoded)
        pad4()
        out.extend(data)
        pad4()

    for ino, (path, data) in enumerate(files.items(), start=1000):
        entry(path.lstrip("/"), data, ino, mode)
    entry("TRAILER!!!", b"", 0, 0)
    out.extend(b"\0" * (-len(out) % 512))
    return bytes(out)


def _wants_fio(script: str) -> bool:
    return re.search(r"(^|[\s;|&(])fio(\s|$)", script) is not None


@dataclass(frozen=True)
class _Launch:
    argv: list[str]
    workdir: Path
    log_path: Path


def _prepare(
    *,
    qemu: Path,
    image: GuestImage,
    script: str | None,
    attach: Attach,
    socket: str | os.PathLike[str] | None,
    disk_image: str | os.PathLike[str] | None,
    smp: int,
    mem: str,
    accel: str | None,
    aio: str,
    fio: bool | None,
    append: str,
    extra_args: Sequence[str],
    serial_extra: Sequence[str],
    log_path: Path | None,
) -> _Launch:
    if attach not in ATTACH_CONFIGS:
        raise ValueError(f"attach must be one of {sorted(ATTACH_CONFIGS)}, not {attach!r}")
    if attach == "vfio-user" and socket is None:
        raise ValueError("attach='vfio-user' needs socket=<the bridge's unix socket>")
    if attach == "builtin" and disk_image is None:
        raise ValueError("attach='builtin' needs image=<a raw image file>")
    workdir = Path(tempfile.mkdtemp(prefix="vscsi-guest-"))
    layers = [image.initramfs.read_bytes()]
    if fio if fio is not None else (script is not None and _wants_fio(script)):
        if not image.fio_layer.is_file():
            raise GuestError("this script runs fio: set VSCSI_FIO_LAYER to a cpio with fio "
                             "(images/build-guest.sh makes fio.cpio) along with VSCSI_KERNEL/VSCSI_INITRD")
        layers.append(image.fio_layer.read_bytes())
    if script is not None:
        layers.append(newc_archive({"script.sh": script.encode()}))
    # The kernel takes an uncompressed cpio only at a 4-byte aligned offset and
    # skips zero padding between archives (init/initramfs.c: unpack_to_rootfs).
    initrd = workdir / "initrd"
    initrd.write_bytes(b"".join(layer + b"\0" * (-len(layer) % 4) for layer in layers))
    accel = accel or detect_accel()
    values = {
        "ACCEL": accel,
        "CPU": "host" if accel.startswith("kvm") else "max",
        "SMP": str(smp),
        "MEM": mem,
        "KERNEL": str(image.kernel),
        "INITRD": str(initrd),
        "APPEND": f"{DEFAULT_APPEND} {append}".strip(),
        "SERIAL": "stdio",
        "SOCKET": str(socket) if socket is not None else "",
        "IMAGE": str(Path(disk_image).resolve()) if disk_image is not None else "",
        "AIO": aio,
    }
    argv = [str(qemu), *load_args("guest.args", values)]
    config = ATTACH_CONFIGS[attach]
    if config is not None:
        argv += load_args(config, values)
    argv += [*serial_extra, *extra_args]
    if log_path is None:
        logs = CACHE / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        _prune_logs(logs)
        log_path = logs / f"guest-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{workdir.name}.log"
    return _Launch(argv=argv, workdir=workdir, log_path=log_path)


def _prune_logs(logs: Path, keep: int = 200) -> None:
    """Keep only the newest ``keep`` console logs."""
    def mtime(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except FileNotFoundError:  # pruned by a concurrent run
            return 0.0

    entries = sorted(logs.glob("guest-*.log"), key=mtime, reverse=True)
    for old in entries[keep:]:
        old.unlink(missing_ok=True)


def _cleanup(workdir: Path) -> None:
    for child in workdir.iterdir():
        child.unlink(missing_ok=True)
    workdir.rmdir()


class _Console:
    """Collects QEMU's stdout/stderr (the guest's ttyS0) into memory and a log file."""

    def __init__(self, log_path: Path):
        self.text = ""
        self._log = log_path.open("w", buffering=1, errors="replace")
        self.started = time.monotonic()
        self.begin_at: float | None = None
        self.exit_rc: int | None = None
        self.changed = trio.Event()

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        decoder = _Utf8Decoder()
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            text = decoder.feed(chunk).replace("\r", "")
            self.text += text
            self._log.write(text)
            if self.begin_at is None and "VSCSI-BEGIN" in self.text:
                self.begin_at = time.monotonic()
            if self.exit_rc is None:
                m = _EXIT_RE.search(self.text)
                if m:
                    self.exit_rc = int(m.group(1))
            self.changed.set()
            self.changed = trio.Event()

    def close(self) -> None:
        self._log.close()


class _Utf8Decoder:
    def __init__(self) -> None:
        import codecs

        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._dec.decode(data)


def script_output(console: str) -> str:
    """The script's own output: the text between VSCSI-BEGIN and VSCSI-EXIT."""
    start = console.find("VSCSI-BEGIN\n")
    if start < 0:
        return ""
    body = console[start + len("VSCSI-BEGIN\n") :]
    m = _EXIT_RE.search(body)
    return body[: m.start()] if m else body


async def _start_qemu(launch: _Launch, console: _Console) -> trio.Process:
    """Start QEMU with its console on a pipe; the command line goes first into the log."""
    console._log.write("# " + " ".join(launch.argv) + "\n")
    return await trio.lowlevel.open_process(
        launch.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, cwd=launch.workdir,
    )  # fmt: skip


async def _kill(process: trio.Process) -> None:
    if process.returncode is None:
        process.kill()
    with trio.move_on_after(10):
        await process.wait()


def disk_check_script(pattern: str, lba: int, wait_seconds: int = 60) -> str:
    """A guest script: list the SCSI devices, sg_inq and sg_readcap the first disk, write one
    4 KiB block of 128 numbered lines of ``pattern`` (20 characters) at 512-byte ``lba`` with
    O_DIRECT and read it back after dropping caches (prints both md5s and READBACK-OK)."""
    return rf"""
set -e
vscsi_wait_disks 1 {wait_seconds}
echo "--- lsscsi"
vscsi_lsscsi
sg=$(vscsi_lsscsi | awk '{{print $7}}' | head -n1)
echo "--- sg_inq $sg"
sg_inq "$sg"
echo "--- sg_readcap"
sg_readcap /dev/sda
echo "--- write+read"
i=0; while [ $i -lt 128 ]; do printf '{pattern}%011d\n' $i; i=$((i + 1)); done >/tmp/block
dd if=/tmp/block of=/dev/sda bs=4096 count=1 seek={lba // 8} oflag=direct conv=fsync 2>/dev/null
echo 3 >/proc/sys/vm/drop_caches
dd if=/dev/sda of=/tmp/back bs=4096 count=1 skip={lba // 8} iflag=direct 2>/dev/null
echo "wrote $(md5sum </tmp/block | cut -c1-32) read $(md5sum </tmp/back | cut -c1-32)"
cmp /tmp/block /tmp/back && echo READBACK-OK
"""


# --- one-shot guests -------------------------------------------------------


async def run_shown(g: GuestSession, script: str, *, timeout: float = 120,
                    prompt: str = "$") -> CommandResult:
    """``g.run`` with the command, its output and its exit status printed (pytest shows
    them for a failing test)."""
    r = await g.run(script, timeout=timeout)
    print(f"{prompt} {script}\n{r.output}(rc={r.rc})")
    return r


async def run_ok(g: GuestSession, script: str, *, timeout: float = 120, prompt: str = "$") -> str:
    """``run_shown`` that must exit 0; its output."""
    r = await run_shown(g, script, timeout=timeout, prompt=prompt)
    assert r.rc == 0, f"{script!r} failed (rc={r.rc}):\n{r.output}"
    return r.output


async def run_guest(
    script: str,
    *,
    attach: Attach = "builtin",
    socket: str | os.PathLike[str] | None = None,
    image: str | os.PathLike[str] | None = None,
    timeout: float = 300,
    smp: int = 2,
    mem: str = "512M",
    accel: str | None = None,
    aio: str = "threads",
    fio: bool | None = None,
    append: str = "",
    extra_args: Sequence[str] = (),
    log_path: Path | None = None,
    on_start: Callable[[trio.Process], Awaitable[None] | None] | None = None,
) -> GuestResult:
    """Boot a guest, run ``script`` (busybox sh) in it, return its exit status and output.

    attach: "vfio-user" (QEMU's vfio-user-pci to the bridge at ``socket``),
    "builtin" (QEMU's own virtio-scsi-pci + scsi-hd on ``image``) or "none".
    fio: append the fio layer to the initramfs (None: only if the script names fio).
    The script may use the helpers in images/guest/helpers.sh (vscsi_wait_disks,
    vscsi_lsscsi). on_start(process) is called once QEMU runs (e.g. to sample
    /proc/<pid>/task/*/stat for CPU accounting). Raises GuestTimeout (QEMU
    killed) or GuestError with the last console lines when the guest does not
    report an exit status.
    """
    qemu, img = await ensure_images()
    accel = accel or await trio.to_thread.run_sync(detect_accel)
    launch = _prepare(
        qemu=qemu, image=img, script=script, attach=attach, socket=socket,
        disk_image=image, smp=smp, mem=mem, accel=accel, aio=aio, fio=fio,
        append=append, extra_args=extra_args, serial_extra=(), log_path=log_path,
    )  # fmt: skip
    console = _Console(launch.log_path)
    timed_out = False
    try:
        process = await _start_qemu(launch, console)
        try:
            assert process.stdout is not None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(console.pump, process.stdout)
                if on_start is not None:
                    started = on_start(process)
                    if started is not None:
                        await started
                with trio.move_on_after(timeout) as scope:
                    await process.wait()
                timed_out = scope.cancelled_caught
                if timed_out:  # kill now: the pump ends only when QEMU's stdout closes
                    await _kill(process)
        finally:
            with trio.CancelScope(shield=True):  # reap QEMU even when cancelled
                await _kill(process)
    finally:
        console.close()
        _cleanup(launch.workdir)
    text = console.text
    if timed_out:
        raise GuestTimeout(f"guest did not finish within {timeout} s", text, launch.log_path)
    if console.exit_rc is None:
        raise GuestError(
            f"guest ended (QEMU exit status {process.returncode}) without VSCSI-EXIT",
            text, launch.log_path,
        )  # fmt: skip
    end = time.monotonic()
    return GuestResult(
        rc=console.exit_rc,
        output=script_output(text),
        console=text,
        log_path=launch.log_path,
        boot_seconds=(console.begin_at or end) - console.started,
        elapsed_seconds=end - console.started,
    )


# --- long-lived guests -----------------------------------------------------


class GuestSession:
    """A running guest that executes commands sent over its second serial port (ttyS1)."""

    def __init__(self, process: trio.Process, console: _Console, control: trio.SocketStream,
                 qmp_path: Path, log_path: Path):  # fmt: skip
        self.process = process
        self.console = console
        self.log_path = log_path
        self.qmp_path = qmp_path
        self._control = control
        self._buffer = b""
        self._next_id = 1
        self._lock = trio.Lock()
        self._rebooting = False
        self.boot_timeout = 180.0

    async def _readline(self) -> str:
        while b"\n" not in self._buffer:
            chunk = await self._control.receive_some(65536)
            if not chunk:
                raise GuestError("guest closed its control port", self.console.text, self.log_path)
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode(errors="replace").strip("\r")

    async def wait_hello(self) -> None:
        """Wait until the guest's command loop has (re)started and greeted us."""
        while (await self._readline()) != "HELLO":
            pass
        self._rebooting = False

    async def reboot(self, timeout: float | None = None) -> None:
        """Reset the machine (QMP system_reset) and wait until the guest serves again."""
        await self.qmp("system_reset")
        await self._wait_rebooted(timeout)

    async def _wait_rebooted(self, timeout: float | None) -> None:
        limit = self.boot_timeout if timeout is None else timeout
        with trio.move_on_after(limit) as scope:
            await self.wait_hello()
        if scope.cancelled_caught:
            raise GuestTimeout(
                f"guest did not come back within {limit} s of a reset",
                self.console.text, self.log_path,
            )  # fmt: skip

    async def run(self, script: str, timeout: float = 120) -> CommandResult:
        """Run ``script`` (busybox sh, helpers loaded) in the guest; its rc and output."""
        async with self._lock:
            if self._rebooting:  # after a system_reset: wait for the new boot's loop
                await self._wait_rebooted(None)
            cid = self._next_id
            self._next_id += 1
            payload = base64.b64encode(
                (". /lib/vscsi/helpers.sh\n" + script).encode()
            ).decode()
            await self._control.send_all(f"RUN {cid} {payload}\n".encode())
            output = ""
            with trio.move_on_after(timeout) as scope:
                while True:
                    parts = (await self._readline()).split(" ", 2)
                    if parts[0] == "OUT" and len(parts) >= 2 and parts[1] == str(cid):
                        output = base64.b64decode(parts[2] if len(parts) == 3 else "").decode(
                            errors="replace"
                        )
                    elif parts[0] == "DONE" and len(parts) == 3 and parts[1] == str(cid):
                        return CommandResult(rc=int(parts[2]), output=output)
            assert scope.cancelled_caught
            raise GuestTimeout(
                f"command {cid} did not finish within {timeout} s", self.console.text, self.log_path
            )

    async def qmp(self, command: str, **arguments: object) -> object:
        """Execute one QMP command on this guest's QEMU; its "return" value."""
        stream = await trio.open_unix_socket(str(self.qmp_path))
        async with stream:
            buf = b""

            async def message() -> dict[str, object]:
                nonlocal buf
                while True:
                    while b"\n" not in buf:
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            raise GuestError("QMP connection closed")
                        buf += chunk
                    line, _, buf = buf.partition(b"\n")
                    msg = json.loads(line)
                    if "event" not in msg:  # asynchronous events are skipped
                        return msg

            await message()  # greeting
            await stream.send_all(b'{"execute":"qmp_capabilities"}\n')
            await message()
            request: dict[str, object] = {"execute": command}
            if arguments:
                request["arguments"] = arguments
            await stream.send_all(json.dumps(request).encode() + b"\n")
            reply = await message()
        if "error" in reply:
            raise GuestError(f"QMP {command} failed: {reply['error']}")
        if command == "system_reset":
            self._rebooting = True
        return reply.get("return")

    async def poweroff(self, timeout: float = 30) -> int | None:
        """Ask the guest to power off; kill QEMU if it does not within ``timeout``."""
        with trio.move_on_after(timeout):
            try:
                await self._control.send_all(b"POWEROFF\n")
            except trio.BrokenResourceError:
                pass
            await self.process.wait()
        await _kill(self.process)
        return self.process.returncode


@asynccontextmanager
async def guest_session(
    *,
    attach: Attach = "builtin",
    socket: str | os.PathLike[str] | None = None,
    image: str | os.PathLike[str] | None = None,
    boot_timeout: float = 180,
    smp: int = 2,
    mem: str = "512M",
    accel: str | None = None,
    aio: str = "threads",
    fio: bool = False,
    append: str = "",
    extra_args: Sequence[str] = (),
    log_path: Path | None = None,
) -> AsyncIterator[GuestSession]:
    """A long-lived guest: ``await session.run(script)`` as often as needed.

    Commands go over a second serial port (ttyS1, a unix socket QEMU serves);
    the console log is kept as in run_guest. ``session.qmp(...)`` talks to
    QEMU's monitor (device_add/device_del, system_reset, ...). Resets reboot
    the guest here (not power off): after ``qmp("system_reset")`` the next
    ``run`` waits for the rebooted guest; ``session.reboot()`` does both. On
    exit the guest is powered off (QEMU killed if it does not stop).
    """
    qemu, img = await ensure_images()
    accel = accel or await trio.to_thread.run_sync(detect_accel)
    launch_tmp = Path(tempfile.mkdtemp(prefix="vscsi-ctl-"))
    control_path = launch_tmp / "ttyS1.sock"
    qmp_path = launch_tmp / "qmp.sock"
    serial_extra = [
        "-chardev", f"socket,id=vscsictl,path={control_path},server=on,wait=on",
        "-serial", "chardev:vscsictl",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
        # Long-lived guests may be reset (system_reset); this overrides guest.args'
        # -no-reboot, with which a reset would end QEMU.
        "-action", "reboot=reset",
    ]  # fmt: skip
    launch = _prepare(
        qemu=qemu, image=img, script=None, attach=attach, socket=socket, disk_image=image,
        smp=smp, mem=mem, accel=accel, aio=aio, fio=fio,
        append=f"vscsi.interactive=1 {append}".strip(), extra_args=extra_args,
        serial_extra=serial_extra, log_path=log_path,
    )  # fmt: skip
    console = _Console(launch.log_path)
    try:
        process = await _start_qemu(launch, console)
        try:
            assert process.stdout is not None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(console.pump, process.stdout)
                control: trio.SocketStream | None = None
                with trio.move_on_after(boot_timeout) as scope:
                    # QEMU waits (wait=on) for this connection before it runs the guest.
                    while control is None:
                        if process.returncode is not None or process.poll() is not None:
                            raise GuestError("QEMU exited at start", console.text, launch.log_path)
                        try:
                            control = await trio.open_unix_socket(str(control_path))
                        except OSError:
                            await trio.sleep(0.05)
                    session = GuestSession(process, console, control, qmp_path, launch.log_path)
                    session.boot_timeout = boot_timeout
                    await session.wait_hello()
                if scope.cancelled_caught:
                    raise GuestTimeout(
                        f"guest did not start serving within {boot_timeout} s",
                        console.text, launch.log_path,
                    )  # fmt: skip
                try:
                    yield session
                finally:
                    with trio.CancelScope(shield=True):
                        await session.poweroff()
                        await control.aclose()
        finally:
            with trio.CancelScope(shield=True):
                await _kill(process)
    finally:
        console.close()
        _cleanup(launch.workdir)
        for p in (control_path, qmp_path):
            p.unlink(missing_ok=True)
        launch_tmp.rmdir()
