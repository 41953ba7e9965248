"""Real Xen 4.17 booted in QEMU (TCG): run a shell script in a PV dom0, report what happened.

The environment comes from images/xen/build.sh (cached; built on first use). One run is one boot:

    Xen (multiboot) -> PV dom0 (Debian kernel, busybox initramfs) -> 9p root (debootstrapped bookworm)
    -> images/xen/dom0-init.sh: xenstored, xen-init-dom0, xenconsoled (guest consoles logged)
    -> the caller's dom0 script, with images/xen/lib.sh sourced -> power off.

Inside dom0: /vscsi/src is the checkout under test (read-only), /vscsi/img the built image, /vscsi/run
this run's directory (shared with the host: files given in ``files`` appear there, domU consoles are
logged to /vscsi/run/console/guest-<name>.log).

Typical use (see test_xen_kernel_backend.py)::

    result = await run_xen(DOM0_SCRIPT, files={"guest.sh": GUEST_SCRIPT}, timeout=600)
    assert result.rc == 0, result.describe()
    assert "VSCSI-DOMU-RC=0" in result.domu_output

Environment: VSCSI_CACHE (build cache), VSCSI_QEMU or VSCSI_XEN_QEMU (qemu-system-x86_64 to use,
default Debian's; VSCSI_KERNEL/VSCSI_INITRD do not apply: dom0 and domU initramfs carry the modules
of the one Debian kernel images/xen/build.sh unpacks),
VSCSI_XEN_ACCEL (default "tcg,thread=multi": the KVM on these machines cannot run Xen),
VSCSI_XEN_KEEP=1 keeps run directories.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import trio

from harness import REPO

IMAGES = REPO / "images" / "xen"
BEGIN = "VSCSI-XEN-DOM0-SCRIPT-BEGIN"
END = "VSCSI-XEN-DOM0-SCRIPT-END"
RC_RE = re.compile(r"VSCSI-XEN-DOM0-RC=(\d+)")
# Copied into every run directory (so editing them never rebuilds the image).
DOM0_HELPERS = ("dom0-init.sh", "lib.sh")


class XenEnvironmentError(RuntimeError):
    """The Xen environment could not be built or booted (the reason is in the message)."""


@dataclass(frozen=True)
class XenResult:
    rc: int | None
    """Exit status of the dom0 script; None if dom0 never reported one (crash, hang, timeout)."""
    output: str
    """The whole serial console: Xen, the dom0 kernel, dom0 init and the dom0 script."""
    domu_output: str
    """Consoles of all domUs, as xenconsoled logged them (one '=== guest-NAME ===' header each)."""
    seconds: float
    timed_out: bool
    run_dir: Path | None
    """Kept only with VSCSI_XEN_KEEP=1 (or keep=True)."""

    @property
    def script_output(self) -> str:
        """What the dom0 script printed (between the begin and end markers)."""
        text = self.output.replace("\r", "")
        start = text.find(BEGIN)
        if start < 0:
            return ""
        start += len(BEGIN)
        end = text.find(END, start)
        return text[start:] if end < 0 else text[start:end]

    def domu_console(self, name: str) -> str:
        """The console of one domU (by its xl name)."""
        marker = f"=== guest-{name} ===\n"
        start = self.domu_output.find(marker)
        if start < 0:
            return ""
        start += len(marker)
        end = self.domu_output.find("\n=== guest-", start)
        return self.domu_output[start:] if end < 0 else self.domu_output[start:end]

    def describe(self, tail: int = 6000) -> str:
        """A summary for assertion messages: rc, time, and the ends of both consoles."""
        return (
            f"rc={self.rc} timed_out={self.timed_out} seconds={self.seconds:.1f}\n"
            f"--- serial (last {tail} chars) ---\n{self.output[-tail:]}\n"
            f"--- domU consoles (last {tail} chars) ---\n{self.domu_output[-tail:]}"
        )


async def build_xen_env() -> Path:
    """Build (or reuse from the cache) the Xen environment; returns its directory."""
    proc = await trio.run_process(
        ["bash", str(IMAGES / "build.sh")], capture_stdout=True, capture_stderr=True, check=False
    )
    if proc.returncode != 0:
        raise XenEnvironmentError(
            f"images/xen/build.sh failed ({proc.returncode}):\n{proc.stderr.decode(errors='replace')[-4000:]}"
        )
    out = Path(proc.stdout.decode().strip().splitlines()[-1])
    for name in ("xen", "vmlinuz", "dom0-initrd.gz", "domu-initrd.gz", "rootfs"):
        if not (out / name).exists():
            raise XenEnvironmentError(f"built environment {out} lacks {name}")
    return out


def qemu_binary() -> str:
    """The QEMU that boots Xen: $VSCSI_QEMU (as for every booted test), $VSCSI_XEN_QEMU (for
    Xen only), else Debian's qemu-system-x86_64."""
    qemu = (os.environ.get("VSCSI_QEMU") or os.environ.get("VSCSI_XEN_QEMU")
            or shutil.which("qemu-system-x86_64"))
    if not qemu:
        raise XenEnvironmentError(
            "qemu-system-x86_64 not found: apt-get install qemu-system-x86 or set VSCSI_QEMU"
        )
    return qemu


def qemu_command(
    env: Path, run_dir: Path, checkout: Path, *, memory_mb: int, dom0_mem_mb: int, cpus: int,
    extra_shares: Mapping[str, Path] | None = None,
) -> list[str]:
    """The QEMU command line that boots Xen with the PV dom0 (9p shares root, img, run, src,
    and ``extra_shares``: mount tag -> host directory, read-only, mounted by the dom0 script)."""
    accel = os.environ.get("VSCSI_XEN_ACCEL", "tcg,thread=multi")
    xen_args = (
        f"console=com1 com1=115200,8n1 dom0_mem={dom0_mem_mb}M,max:{dom0_mem_mb}M "
        f"dom0_max_vcpus={cpus} loglvl=all guest_loglvl=all"
    )
    # Multiboot modules are comma-separated in -initrd: the dom0 arguments must not contain commas.
    dom0_args = "console=hvc0 earlyprintk=xen loglevel=5"
    shares = [
        ("root", env / "rootfs", True),
        ("img", env, True),
        ("run", run_dir, False),
        ("src", checkout, True),
        *((tag, path, True) for tag, path in (extra_shares or {}).items()),
    ]
    cmd = [
        qemu_binary(),
        "-machine", "pc",
        "-accel", accel,
        # Xen in TCG: -cpu max crashes the PV dom0 at its first instruction; qemu64,+svm works.
        "-cpu", "qemu64,+svm",
        "-smp", str(cpus),
        "-m", str(memory_mb),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-monitor", "none",
        "-serial", f"file:{run_dir / 'serial.log'}",
        "-kernel", str(env / "xen"),
        "-append", xen_args,
        "-initrd", f"{env / 'vmlinuz'} {dom0_args},{env / 'dom0-initrd.gz'}",
    ]  # fmt: skip
    for tag, path, readonly in shares:
        spec = f"local,path={Path(path).resolve()},mount_tag={tag},security_model=passthrough"
        cmd += ["-virtfs", spec + (",readonly=on" if readonly else "")]
    return cmd


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _domu_consoles(run_dir: Path) -> str:
    parts = []
    for log in sorted((run_dir / "console").glob("guest-*.log")):
        parts.append(f"=== {log.stem} ===\n" + _read(log).replace("\r", ""))
    return "\n".join(parts)


async def _follow(run_dir: Path, progress: Callable[[str], None]) -> None:
    """Report new complete lines of the serial log and the domU console logs every 2 s."""
    offsets: dict[Path, int] = {}
    while True:
        await trio.sleep(2)
        logs = [run_dir / "serial.log", *sorted((run_dir / "console").glob("guest-*.log"))]
        for log in logs:
            try:
                data = log.read_bytes()
            except OSError:
                continue
            start = offsets.get(log, 0)
            end = data.rfind(b"\n") + 1
            if end <= start:
                continue
            offsets[log] = end
            prefix = "" if log.name == "serial.log" else log.stem.removeprefix("guest-") + ": "
            for line in data[start:end].decode(errors="replace").replace("\r", "").splitlines():
                if line.strip():
                    progress(prefix + line)


async def run_xen(
    dom0_script: str,
    *,
    timeout: float = 600,
    files: Mapping[str, str | bytes] | None = None,
    checkout: Path | None = None,
    memory_mb: int = 2048,
    dom0_mem_mb: int = 1024,
    cpus: int = 2,
    keep: bool | None = None,
    progress: Callable[[str], None] | None = None,
    extra_shares: Mapping[str, Path] | None = None,
) -> XenResult:
    """Boot Xen, run ``dom0_script`` (POSIX sh, lib.sh sourced) in dom0, return what happened.

    ``files`` are written into the run directory (/vscsi/run/NAME in dom0), e.g. guest scripts.
    ``checkout`` is the source tree shared as /vscsi/src (default: this checkout).
    Raises XenEnvironmentError if the environment cannot be built or QEMU cannot start; a dom0
    that crashes or hangs gives rc None (and timed_out for a hang) with the console to look at.
    ``progress`` is called with each new line of dom0's serial console and of the domU consoles
    (prefixed with the domU's name) while the boot runs: long jobs show where they are.
    """
    env = await build_xen_env()
    keep = os.environ.get("VSCSI_XEN_KEEP") == "1" if keep is None else keep
    run_dir = Path(tempfile.mkdtemp(prefix="xen-run-", dir=env.parent))
    try:
        for helper in DOM0_HELPERS:
            shutil.copy(IMAGES / helper, run_dir / helper)
        (run_dir / "test.sh").write_text(dom0_script)
        (run_dir / "console").mkdir()
        for name, content in (files or {}).items():
            target = run_dir / name
            if target.resolve().parent != run_dir.resolve():
                raise ValueError(f"files: {name!r} must be a plain file name")
            if isinstance(content, str):
                target.write_text(content)
            else:
                target.write_bytes(content)
        cmd = qemu_command(
            env, run_dir, checkout or REPO, memory_mb=memory_mb, dom0_mem_mb=dom0_mem_mb, cpus=cpus,
            extra_shares=extra_shares,
        )
        (run_dir / "qemu.cmd").write_text(" ".join(cmd) + "\n")
        start = time.monotonic()
        timed_out = False
        with open(run_dir / "qemu.log", "wb") as qemu_log:
            try:
                proc = await trio.lowlevel.open_process(cmd, stdout=qemu_log, stderr=qemu_log)
            except OSError as exc:
                raise XenEnvironmentError(f"cannot start QEMU: {exc}") from exc
            with trio.move_on_after(timeout) as scope:
                if progress is None:
                    await proc.wait()
                else:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_follow, run_dir, progress)
                        await proc.wait()
                        nursery.cancel_scope.cancel()
            if scope.cancelled_caught:
                timed_out = True
                proc.kill()
                await proc.wait()
        seconds = time.monotonic() - start
        output = _read(run_dir / "serial.log").replace("\r", "")
        qemu_errors = _read(run_dir / "qemu.log")
        if qemu_errors.strip():
            output += f"\n=== qemu stderr ===\n{qemu_errors}"
        match = RC_RE.search(output)
        return XenResult(
            rc=int(match.group(1)) if match else None,
            output=output,
            domu_output=_domu_consoles(run_dir),
            seconds=seconds,
            timed_out=timed_out,
            run_dir=run_dir if keep else None,
        )
    finally:
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
