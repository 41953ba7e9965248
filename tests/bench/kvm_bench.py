"""Benchmark (not a test): fio in a booted guest, the bridge over vfio-user against QEMU's virtio-scsi.

    python tests/bench/kvm_bench.py [--quick] [--runtime S] [--profile] [--cached-builtin] [--warm]
                                    [--repeat N] [--bridge-rev REV|worktree] [--before-rev REV]
                                    [--only a,b]

In ONE run, on the same guest (images/build-guest.sh, 2 vCPUs, 512 MiB) and the same
pre-written raw image file, fio runs inside the guest against

* ``bridge``: ``python -m bridge.cli serve`` (a committed snapshot of bridge/, --bridge-rev) in its own process (so that its CPU time is
  /proc/<pid>/stat utime+stime), the guest attached with qemu-configs/vfio-user.args;
* ``qemu-threads`` and ``qemu-io_uring``: QEMU's built-in virtio-scsi-pci + scsi-hd
  (qemu-configs/builtin-virtio-scsi.args, cache.direct=true) with aio=threads / io_uring;
  each row compares the bridge with the better of the two on that row (issue 14's goals);
* with ``--cached-builtin`` also ``qemu-cached``: the same with cache.direct=false
  (QEMU through the host page cache, as the bridge's backing store is), for information;
* with ``--warm`` also ``bridge-warm`` and ``qemu-cached-warm``: the image read into the host
  page cache first. Every other configuration starts with the image evicted from the page
  cache (posix_fadvise DONTNEED on that one file), so reads are cold.

Jobs (fio, libaio, direct=1, time based): 4 KiB random read at iodepth 1 (clat p50/p99),
4 KiB random read at iodepth 32 (IOPS), 128 KiB sequential read and write at iodepth 8
(MB/s). Device-side CPU per I/O: CPU seconds spent during the job divided by the I/Os fio
completed, for the bridge process and for QEMU's threads other than the vCPUs ("CPU n/TCG",
named because QEMU runs with ``-name ...,debug-threads=on``): main loop, thread-pool
workers, io_uring workers, RCU. For the bridge configuration QEMU's non-vCPU threads still
do work (vfio-user messages, interrupt injection), so the bridge's total device side is
bridge + those.

Prints progress, then the table (bridge, best built-in, ratio, goal); writes
$VSCSI_CACHE/bench/kvm-<timestamp>.{json,md,png} (matplotlib is pip-installed into this
interpreter's environment if missing) and, with --profile, a py-spy profile of the bridge
during an extra iodepth-32 job (not the measured one): top 15 functions printed, collapsed
stacks and a flame graph SVG written next to the table. See tests/bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import trio  # noqa: E402

from harness.bench import BENCH_DIR, export_bridge_rev, pip_install  # noqa: E402
from harness.guest import GuestSession, guest_session, load_args  # noqa: E402
from harness.profile import (  # noqa: E402
    drop_thread_roots,
    flamegraph_svg,
    parse_collapsed,
    py_spy_binary,
    split_waiting,
    top_functions,
)

IMAGE_SIZE = 256 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
VCPU_THREAD = re.compile(r"^CPU \d+/(TCG|KVM)$")
PERCENTILES = [1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99, 99.5, 99.9]
INITIATOR = "iqn.2026-11.org.vscsi-bridge:bench"


def log(msg: str) -> None:
    print(f"[kvm-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- jobs ---------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    key: str
    title: str
    rw: str
    bs: str
    iodepth: int

    def fio_command(self, runtime: int, device: str = "/dev/sda") -> str:
        pct = ":".join(f"{p:g}" for p in PERCENTILES)
        return (
            f"fio --name={self.key} --filename={device} --direct=1 --ioengine=libaio"
            f" --rw={self.rw} --bs={self.bs} --iodepth={self.iodepth} --numjobs=1"
            f" --time_based=1 --runtime={runtime} --norandommap=1 --randrepeat=0"
            f" --percentile_list={pct} --output-format=json --output=/tmp/fio.json"
            " >/tmp/fio.err 2>&1; rc=$?; cat /tmp/fio.json; cat /tmp/fio.err >&2; exit $rc"
        )


JOBS = [
    Job("randread-qd1", "4 KiB random read, iodepth 1", "randread", "4k", 1),
    Job("randread-qd32", "4 KiB random read, iodepth 32", "randread", "4k", 32),
    Job("seqread", "128 KiB sequential read, iodepth 8", "read", "128k", 8),
    Job("seqwrite", "128 KiB sequential write, iodepth 8", "write", "128k", 8),
]


@dataclass
class JobResult:
    ios: int
    iops: float
    mbps: float  # 10^6 bytes/s
    clat_us: dict[str, float]  # percentile -> microseconds
    clat_mean_us: float
    window_s: float  # host wall time around the guest command (fio start to exit)
    device_cpu_s: float  # bridge process (bridge config) or QEMU non-vCPU threads (built-in)
    qemu_other_cpu_s: float  # QEMU non-vCPU threads (same as device_cpu_s for built-in)
    qemu_vcpu_cpu_s: float

    def per_io_us(self, seconds: float) -> float:
        return seconds / self.ios * 1e6 if self.ios else math.nan


@dataclass
class ConfigResult:
    name: str
    description: str
    jobs: dict[str, JobResult] = field(default_factory=dict)
    idle: dict[str, float] = field(default_factory=dict)  # CPU % of one core while idle
    boot_s: float = 0.0


def parse_fio(output: str) -> dict[str, Any]:
    start = output.find("{")
    if start < 0:
        raise RuntimeError(f"no fio JSON in guest output:\n{output[-2000:]}")
    data, _ = json.JSONDecoder().raw_decode(output[start:])
    return data


def job_figures(data: dict[str, Any], job: Job) -> tuple[int, float, float, dict[str, float], float]:
    j = data["jobs"][0]
    side = j["write"] if job.rw in ("write", "randwrite") else j["read"]
    ios = int(j["read"]["total_ios"]) + int(j["write"]["total_ios"])
    pct = {f"{float(k):g}": v / 1000.0 for k, v in side["clat_ns"].get("percentile", {}).items()}
    return ios, float(side["iops"]), float(side["bw_bytes"]) / 1e6, pct, side["clat_ns"]["mean"] / 1000.0


# --- CPU accounting from /proc ----------------------------------------------------


def _stat_times(path: str) -> tuple[str, float]:
    """(comm, utime+stime seconds) from a /proc/.../stat file."""
    with open(path) as f:
        text = f.read()
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return comm, (int(fields[11]) + int(fields[12])) / CLK_TCK  # proc(5): utime, stime


def process_cpu(pid: int) -> float:
    """utime+stime of the whole process, exited threads included."""
    return _stat_times(f"/proc/{pid}/stat")[1]


def qemu_cpu(pid: int) -> tuple[float, float]:
    """(vCPU threads, all other threads) CPU seconds of a QEMU process.

    The process total includes threads that already exited (QEMU's thread-pool
    workers come and go), so "other" is the total minus the live vCPU threads,
    which live as long as the machine.
    """
    total = process_cpu(pid)
    vcpu = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm, t = _stat_times(f"/proc/{pid}/task/{tid}/stat")
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        if VCPU_THREAD.match(comm):
            vcpu += t
    return vcpu, total - vcpu


def qemu_threads(pid: int) -> dict[str, float]:
    """Thread name -> CPU seconds (live threads), for the record."""
    out: dict[str, float] = defaultdict(float)
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm, t = _stat_times(f"/proc/{pid}/task/{tid}/stat")
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        out[re.sub(r"\d+$", "N", comm) if comm.startswith("iou-wrk") else comm] += t
    return dict(out)


# --- installs -----------------------------------------------------------------------


# --- image and bridge process --------------------------------------------------------


def prepare_image(path: Path) -> None:
    """A 256 MiB raw image filled with pseudo-random data, so no read hits a hole."""
    marker = path.with_suffix(".complete")
    if path.exists() and marker.exists() and path.stat().st_size == IMAGE_SIZE:
        log(f"image {path} (256 MiB, pre-written) reused")
        return
    log(f"writing {path} (256 MiB of pseudo-random data)")
    marker.unlink(missing_ok=True)
    block = hashlib.shake_256(b"vscsi-bench").digest(1 << 20)
    with path.open("wb") as f:
        for i in range(IMAGE_SIZE >> 20):
            f.write(i.to_bytes(8, "little") + block[8:])
        f.flush()
        os.fsync(f.fileno())
    marker.write_text("ok\n")


def drop_file_cache(path: Path) -> None:
    """Evict this one file from the host page cache (not the whole machine's)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_file_cache(path: Path) -> None:
    """Read the whole image once so that every block is in the host page cache."""
    with path.open("rb", buffering=0) as f:
        buf = bytearray(1 << 20)
        while f.readinto(buf):
            pass


def bridge_config(run_dir: Path, image: Path, doorbell: str = "trap") -> Path:
    cfg = run_dir / "bridge.toml"
    cfg.write_text(
        f"""[bridge]
state_dir = "{run_dir}"
log_level = "warning"

[[lu]]
name = "bench0"
path = "{image}"
block_size = 512

[[vfio_user]]
socket = "bench.sock"
initiator = "{INITIATOR}"
num_queues = 2
queue_size = 256
doorbell = "{doorbell}"
luns = {{ 0 = "bench0" }}
"""
    )
    return cfg


def export_bridge(rev: str) -> tuple[Path, str]:
    """The bridge package as committed at ``rev`` (``harness.bench.export_bridge_rev``), or
    ``worktree``: the checkout as it is."""
    if rev == "worktree":
        return REPO, bridge_version()
    dest = export_bridge_rev(rev)
    return dest, f"{dest.name.removeprefix('src-')} (committed snapshot in {dest})"


async def start_bridge(run_dir: Path, image: Path, log_path: Path, source: Path,
                       doorbell: str = "trap") -> trio.Process:
    cfg = bridge_config(run_dir, image, doorbell)
    ready = run_dir / "ready"
    # -m with cwd=source: sys.path[0] is the snapshot, ahead of the venv's editable install
    argv = [sys.executable, "-m", "bridge.cli", "serve", "--config", str(cfg), "--ready-file", str(ready)]
    log_file = log_path.open("wb")
    proc = await trio.lowlevel.open_process(argv, cwd=str(source), stdout=log_file, stderr=subprocess.STDOUT)
    with trio.move_on_after(60):
        while not ready.exists():
            if proc.poll() is not None:
                break
            await trio.sleep(0.05)
    if not ready.exists():
        proc.kill()
        raise RuntimeError(f"bridge did not become ready:\n{log_path.read_text()[-2000:]}")
    return proc


async def stop_process(proc: trio.Process, sig: int = signal.SIGTERM, grace: float = 15) -> None:
    """Send ``sig`` (py-spy and perf write their output on SIGINT), wait ``grace`` seconds,
    then kill."""
    if proc.returncode is None:
        proc.send_signal(sig)
    with trio.move_on_after(grace):
        await proc.wait()
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


# --- one configuration ------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    description: str
    attach: str  # "vfio-user" or "builtin"
    aio: str = "threads"
    cached: bool = False
    warm: bool = False  # image read into the host page cache first (else evicted)
    doorbell: str = "trap"  # the bridge's [[vfio_user]] doorbell (trap or poll)
    rev: str | None = None  # the bridge as committed at this revision (default: --bridge-rev)


async def measure_idle(pid_bridge: int | None, pid_qemu: int, seconds: float) -> dict[str, float]:
    b0 = process_cpu(pid_bridge) if pid_bridge else 0.0
    v0, o0 = qemu_cpu(pid_qemu)
    t0 = time.monotonic()
    await trio.sleep(seconds)
    dt = time.monotonic() - t0
    b1 = process_cpu(pid_bridge) if pid_bridge else 0.0
    v1, o1 = qemu_cpu(pid_qemu)
    idle = {"qemu_other_pct": (o1 - o0) / dt * 100, "qemu_vcpu_pct": (v1 - v0) / dt * 100}
    if pid_bridge:
        idle["bridge_pct"] = (b1 - b0) / dt * 100
    return idle


async def run_job(guest: GuestSession, job: Job, runtime: int, bridge_pid: int | None) -> JobResult:
    qpid = guest.process.pid
    b0 = process_cpu(bridge_pid) if bridge_pid else 0.0
    v0, o0 = qemu_cpu(qpid)
    t0 = time.monotonic()
    r = await guest.run(job.fio_command(runtime), timeout=runtime + 120)
    window = time.monotonic() - t0
    b1 = process_cpu(bridge_pid) if bridge_pid else 0.0
    v1, o1 = qemu_cpu(qpid)
    if r.rc != 0:
        raise RuntimeError(f"fio {job.key} failed (rc {r.rc}):\n{r.output[-3000:]}")
    ios, iops, mbps, pct, mean = job_figures(parse_fio(r.output), job)
    device = (b1 - b0) if bridge_pid else (o1 - o0)
    return JobResult(ios=ios, iops=iops, mbps=mbps, clat_us=pct, clat_mean_us=mean, window_s=window,
                     device_cpu_s=device, qemu_other_cpu_s=o1 - o0, qemu_vcpu_cpu_s=v1 - v0)


def cached_builtin_args(values: dict[str, str]) -> list[str]:
    args = load_args("builtin-virtio-scsi.args", values)
    return [a.replace('"cache":{"direct":true}', '"cache":{"direct":false}') for a in args]


async def run_variant(variant: Variant, image: Path, runtime: int, profile: ProfileSpec | None,
                      prefix: Path, source: Path, perf: PerfSpec | None = None) -> ConfigResult:
    res = ConfigResult(variant.name, variant.description)
    if variant.warm:
        warm_file_cache(image)
    else:
        drop_file_cache(image)
    # under BENCH_DIR, not /tmp, where other jobs' clean-ups may remove it; socket path < 108 bytes
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=BENCH_DIR))
    bridge: trio.Process | None = None
    common = {"smp": 2, "mem": "512M", "fio": True, "boot_timeout": 300.0,
              "extra_args": ["-name", f"bench-{variant.name},debug-threads=on"]}
    try:
        if variant.attach == "vfio-user":
            bridge_log = Path(f"{prefix}-{variant.name}-bridge.log")
            bridge = await start_bridge(run_dir, image, bridge_log, source, variant.doorbell)
            log(f"{variant.name}: bridge pid {bridge.pid} ready (log {bridge_log})")
            session = guest_session(attach="vfio-user", socket=run_dir / "bench.sock", **common)
        elif variant.cached:
            values = {"MEM": "512M", "SMP": "2", "IMAGE": str(image), "AIO": variant.aio}
            common["extra_args"] += cached_builtin_args(values)
            session = guest_session(attach="none", **common)
        else:
            session = guest_session(attach="builtin", image=image, aio=variant.aio, **common)
        t0 = time.monotonic()
        async with session as guest:
            r = await guest.run("vscsi_wait_disks 1 60 && vscsi_lsscsi", timeout=120)
            if r.rc != 0 or "/dev/sda" not in r.output:
                raise RuntimeError(f"{variant.name}: guest sees no disk:\n{r.output}")
            res.boot_s = time.monotonic() - t0
            log(f"{variant.name}: guest up in {res.boot_s:.0f} s, QEMU pid {guest.process.pid}: "
                f"{r.output.strip()}")
            bpid = bridge.pid if bridge else None
            res.idle = await measure_idle(bpid, guest.process.pid, 3.0)
            log(f"{variant.name}: idle CPU " + ", ".join(f"{k} {v:.1f}%" for k, v in res.idle.items()))
            for job in JOBS:
                log(f"{variant.name}: {job.title}, {runtime} s ...")
                jr = await run_job(guest, job, runtime, bpid)
                res.jobs[job.key] = jr
                log(f"{variant.name}: {job.key}: {jr.iops:,.0f} IOPS, {jr.mbps:.1f} MB/s, "
                    f"clat p50 {jr.clat_us.get('50', math.nan):.0f} us p99 {jr.clat_us.get('99', math.nan):.0f} us, "
                    f"device CPU {jr.per_io_us(jr.device_cpu_s):.1f} us/IO "
                    f"(QEMU non-vCPU {jr.per_io_us(jr.qemu_other_cpu_s):.1f} us/IO)")
            if profile is not None and bridge is not None:
                await profile_bridge(guest, bridge.pid, runtime, profile)
            if perf is not None and bridge is not None:
                await perf_bridge(guest, bridge.pid, runtime, perf, image)
            log(f"{variant.name}: QEMU threads (CPU s): " + ", ".join(
                f"{k} {v:.1f}" for k, v in sorted(qemu_threads(guest.process.pid).items())))
    finally:
        if bridge is not None:
            await stop_process(bridge)
        shutil.rmtree(run_dir, ignore_errors=True)
    return res


# --- profiling (py-spy) -----------------------------------------------------------------


@dataclass
class ProfileSpec:
    py_spy: str
    out_prefix: Path
    job_key: str = "randread-qd32"  # which job to repeat while py-spy samples the bridge
    top: list[tuple[str, float, float]] = field(default_factory=list)  # func, self %, total %
    iops: float = 0.0
    samples: int = 0  # busy samples (the top table's 100 %)
    waiting: int = 0  # samples in trio's epoll_wait: the bridge waiting for work
    error: str = ""


async def profile_bridge(guest: GuestSession, pid: int, runtime: int, spec: ProfileSpec) -> None:
    """py-spy record the bridge during an extra run of one job (the measured one is unperturbed)."""
    raw = spec.out_prefix.with_suffix(".pyspy.txt")
    job = next(j for j in JOBS if j.key == spec.job_key)
    log(f"bridge: profiling with py-spy during an extra {job.title} job ...")
    argv = [spec.py_spy, "record", "-p", str(pid), "--format", "raw", "--rate", "100",
            "--nonblocking", "--threads", "-o", str(raw), "--duration", str(runtime + 600)]
    err_path = spec.out_prefix.with_suffix(".pyspy.err")
    with err_path.open("wb") as err:
        spy = await trio.lowlevel.open_process(argv, stdout=subprocess.DEVNULL, stderr=err)
    try:
        await trio.sleep(1.0)
        jr = await run_job(guest, job, runtime, pid)
        spec.iops = jr.iops
    except Exception as e:  # noqa: BLE001  the measured jobs are done; keep them
        spec.error = f"profiled job failed: {type(e).__name__}: {str(e)[:2000]}"
        log(spec.error)
    finally:
        await stop_process(spy, signal.SIGINT, 30)
    if not raw.exists():
        spec.error = f"py-spy wrote no profile: {err_path.read_text(errors='replace')[-500:]!r}"
        log(spec.error)
        return
    stacks = drop_thread_roots(parse_collapsed(raw.read_text()))
    busy, spec.waiting = split_waiting(stacks)
    spec.samples, spec.top = top_functions(busy)
    svg = spec.out_prefix.with_suffix(".flame.svg")
    svg.write_text(flamegraph_svg(stacks, f"vscsi-bridge during fio {job.key}"))
    log(f"bridge profile: {spec.samples} busy samples ({spec.waiting} more waiting in epoll_wait), "
        f"{spec.iops:,.0f} IOPS while profiled; flame graph {svg}")


# --- where the bridge's CPU goes (perf) ----------------------------------------------------

# Kernel paths that say what the bridge's system time is for (perf's "children" share).
PERF_PATHS = [
    ("backing-store I/O (preadv/pwritev, page cache, readahead)", ("do_preadv", "do_pwritev")),
    ("sleeping and waking in epoll_wait", ("do_epoll_wait",)),
    ("eventfd writes (MSI-X interrupts to QEMU)", ("ksys_write",)),
    ("vfio-user socket receive", ("__sys_recvmsg", "___sys_recvmsg")),
    ("AIO submit/reap", ("__x64_sys_io_submit", "__x64_sys_io_getevents")),
    ("interrupts taken while running", ("__irq_exit_rcu", "asm_common_interrupt")),
]


@dataclass
class PerfSpec:
    out_prefix: Path
    job_key: str = "randread-qd1"
    per_io_us: float = 0.0  # the bridge's CPU per I/O during the perf job
    qemu_per_io_us: float = 0.0  # QEMU's non-vCPU threads, same job
    dso: list[tuple[str, float]] = field(default_factory=list)  # shared object, % of samples
    paths: list[tuple[str, float]] = field(default_factory=list)  # PERF_PATHS, % of samples
    kernel_pct: float = 0.0
    error: str = ""

    def lines(self) -> list[str]:
        if self.error:
            return [self.error]
        us = self.per_io_us / 100
        out = [f"bridge CPU per I/O during the perf job: {self.per_io_us:.1f} us; QEMU non-vCPU "
               f"threads for this guest: {self.qemu_per_io_us:.1f} us"]
        out += [f"  {pct:5.1f} %  {pct * us:6.1f} us  {name}" for name, pct in self.dso[:6]]
        out.append(f"  kernel {self.kernel_pct:.1f} % = {self.kernel_pct * us:.1f} us per I/O, of which:")
        out += [f"  {pct:5.1f} %  {pct * us:6.1f} us  {name}" for name, pct in self.paths]
        floor = self.kernel_pct * us + self.qemu_per_io_us
        out.append(f"with no user-space work at all the bridge's guest would still cost {floor:.1f} us "
                   f"of CPU per I/O (the bridge's kernel time + QEMU's share)")
        return out


def _perf_report(data: Path, *sort: str) -> list[tuple[str, float]]:
    """(name, % of samples) rows of ``perf report --sort ...``."""
    r = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "-g", "none", *sort],
                       capture_output=True, text=True, check=False)
    rows = []
    for line in r.stdout.splitlines():
        m = re.match(r"^\s+([\d.]+)%\s+(?:[\d.]+%\s+)?(?:\[[.k]\]\s+)?(.+?)\s*$", line)
        if m and not line.lstrip().startswith("#"):
            rows.append((m.group(2), float(m.group(1))))
    return rows


async def perf_bridge(guest: GuestSession, pid: int, runtime: int, spec: PerfSpec, image: Path) -> None:
    """perf record the bridge during an extra run of one job, the image evicted first as for
    the measured jobs; split its CPU into the interpreter and the kernel paths above."""
    perf = shutil.which("perf")
    if perf is None:
        spec.error = "perf is not installed (linux-perf): no CPU split"
        log(spec.error)
        return
    job = next(j for j in JOBS if j.key == spec.job_key)
    data = spec.out_prefix.with_suffix(".perf.data")
    drop_file_cache(image)
    log(f"bridge: perf record during an extra {job.title} job ...")
    rec = await trio.lowlevel.open_process(
        [perf, "record", "-q", "-F", "999", "-g", "-p", str(pid), "-o", str(data)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await trio.sleep(0.5)
        jr = await run_job(guest, job, runtime, pid)
        spec.per_io_us = jr.per_io_us(jr.device_cpu_s)
        spec.qemu_per_io_us = jr.per_io_us(jr.qemu_other_cpu_s)
    finally:
        await stop_process(rec, signal.SIGINT, 30)
    if not data.exists():
        spec.error = "perf wrote no data (perf_event_paranoid?)"
        log(spec.error)
        return
    spec.dso = await trio.to_thread.run_sync(_perf_report, data, "--no-children", "--sort", "dso")
    spec.kernel_pct = sum(pct for name, pct in spec.dso if name.startswith("[kernel"))
    syms = dict(await trio.to_thread.run_sync(_perf_report, data, "--children", "--sort", "sym"))
    spec.paths = [(label, max((syms.get(n, 0.0) for n in names), default=0.0))
                  for label, names in PERF_PATHS]
    for line in spec.lines():
        log("perf: " + line)


# --- table, files, plot -----------------------------------------------------------------


@dataclass
class Row:
    label: str
    unit: str
    better: str  # "higher" or "lower"
    value: Any  # callable(ConfigResult) -> float
    target: str = ""


def _clat(key: str, pct: str):
    return lambda c: c.jobs[key].clat_us.get(pct, math.nan)


def _cpu(key: str):
    return lambda c: c.jobs[key].per_io_us(c.jobs[key].device_cpu_s)


def _cpu_total(key: str):
    def f(c: ConfigResult) -> float:
        j = c.jobs[key]
        extra = j.qemu_other_cpu_s if c.name.startswith("bridge") else 0.0
        return j.per_io_us(j.device_cpu_s + extra)
    return f


# Goals are issue 14's, each a ratio against the better QEMU built-in on that row.
ROWS = [
    Row("4k randread QD1 clat p50", "us", "lower", _clat("randread-qd1", "50"), "<= 1.0"),
    Row("4k randread QD1 clat p99", "us", "lower", _clat("randread-qd1", "99")),
    Row("4k randread QD1 IOPS", "IOPS", "higher", lambda c: c.jobs["randread-qd1"].iops),
    Row("4k randread QD32 IOPS", "IOPS", "higher", lambda c: c.jobs["randread-qd32"].iops, ">= 1.5"),
    Row("128k seq read", "MB/s", "higher", lambda c: c.jobs["seqread"].mbps, ">= 1.5"),
    Row("128k seq write", "MB/s", "higher", lambda c: c.jobs["seqwrite"].mbps, ">= 1.5"),
    Row("device CPU/IO QD1 (bridge proc; QEMU non-vCPU)", "us", "lower", _cpu("randread-qd1")),
    Row("device CPU/IO QD32", "us", "lower", _cpu("randread-qd32")),
    Row("device CPU/IO seq read", "us", "lower", _cpu("seqread")),
    Row("device CPU/IO seq write", "us", "lower", _cpu("seqwrite")),
    Row("CPU/IO QD1 incl. QEMU non-vCPU (bridge: both)", "us", "lower", _cpu_total("randread-qd1"),
        "<= 1.0"),
    Row("CPU/IO QD32 incl. QEMU non-vCPU (bridge: both)", "us", "lower", _cpu_total("randread-qd32"),
        "<= 1.0"),
]


def throughput_score(c: ConfigResult) -> float:
    vals = [c.jobs["randread-qd1"].iops, c.jobs["randread-qd32"].iops, c.jobs["seqread"].mbps, c.jobs["seqwrite"].mbps]
    return math.exp(sum(math.log(max(v, 1e-9)) for v in vals) / len(vals))


def merge_rounds(rounds: list[ConfigResult]) -> ConfigResult:
    """Medians over repeated rounds of one configuration (per figure, per-I/O CPU included)."""
    if len(rounds) == 1:
        return rounds[0]
    med = statistics.median
    first = rounds[0]
    out = ConfigResult(first.name, first.description, boot_s=med(r.boot_s for r in rounds),
                       idle={k: med(r.idle.get(k, 0.0) for r in rounds) for k in first.idle})
    for key in first.jobs:
        js = [r.jobs[key] for r in rounds]
        ios = max(1, int(med(j.ios for j in js)))
        out.jobs[key] = JobResult(
            ios=ios, iops=med(j.iops for j in js), mbps=med(j.mbps for j in js),
            clat_us={p: med(j.clat_us[p] for j in js if p in j.clat_us) for p in js[0].clat_us},
            clat_mean_us=med(j.clat_mean_us for j in js), window_s=med(j.window_s for j in js),
            # scaled so that per_io_us() gives the median of the per-I/O figures
            device_cpu_s=med(j.per_io_us(j.device_cpu_s) for j in js) * ios / 1e6,
            qemu_other_cpu_s=med(j.per_io_us(j.qemu_other_cpu_s) for j in js) * ios / 1e6,
            qemu_vcpu_cpu_s=med(j.per_io_us(j.qemu_vcpu_cpu_s) for j in js) * ios / 1e6,
        )
    return out


def add_ranges(table: list[dict[str, Any]], rounds: dict[str, list[ConfigResult]]) -> None:
    """entry["range"][config] = [min, max] of the row over the rounds (when repeated)."""
    for row, entry in zip(ROWS, table, strict=True):
        entry["range"] = {n: [min(vals), max(vals)] for n, rs in rounds.items()
                          if len(rs) > 1 for vals in [[row.value(r) for r in rs]]}


def _cell(e: dict[str, Any], name: str) -> str:
    r = e.get("range", {}).get(name)
    return _fmt(e[name]) + (f" ({_fmt(r[0])}-{_fmt(r[1])})" if r else "")


def bridge_key(configs: dict[str, ConfigResult]) -> str:
    """The bridge column: ``bridge`` (cold page cache) or, when only that ran, ``bridge-warm``."""
    return "bridge" if "bridge" in configs else "bridge-warm"


def build_table(configs: dict[str, ConfigResult], base: str,
                builtin: list[str]) -> list[dict[str, Any]]:
    """One entry per row; ``ratio`` is the bridge against the better built-in on that row
    (``best``), as issue 14's goals are stated."""
    table = []
    for row in ROWS:
        entry: dict[str, Any] = {"row": row.label, "unit": row.unit, "better": row.better, "target": row.target}
        for name, c in configs.items():
            entry[name] = row.value(c)
        pick = max if row.better == "higher" else min
        best = pick((n for n in builtin if not math.isnan(entry[n])), key=lambda n: entry[n],
                    default=base)
        entry["best"] = best
        b, q = entry[bridge_key(configs)], entry[best]
        entry["ratio"] = b / q if q else math.nan
        if "bridge-warm" in configs and "qemu-cached-warm" in configs:
            w = entry["qemu-cached-warm"]
            entry["ratio_warm"] = entry["bridge-warm"] / w if w else math.nan
        if "bridge-before" in configs:
            w = entry["bridge-before"]
            entry["after_before"] = b / w if w else math.nan
        if row.target:
            op, limit = row.target.split()
            entry["met"] = entry["ratio"] >= float(limit) if op == ">=" else entry["ratio"] <= float(limit)
        table.append(entry)
    return table


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def markdown(meta: dict[str, Any], table: list[dict[str, Any]], configs: dict[str, ConfigResult],
             base: str, profile: ProfileSpec | None, perf: PerfSpec | None = None) -> str:
    bk = bridge_key(configs)
    others = [n for n in configs if n != bk]
    head = ["row", "unit", bk, "best QEMU", f"ratio {bk}/best", "goal", *others]
    warm = "ratio_warm" in table[0]
    if warm:
        head.append("ratio bridge-warm/qemu-cached-warm")
    lever = "after_before" in table[0]
    if lever:
        head.append("bridge / bridge-before")
    lines = [f"# kvm_bench {meta['timestamp']}", "",
             f"Machine: {meta['machine']}. Bridge: {meta['bridge_version']}. Accelerator: {meta['accel']}. Load average at start "
             f"{meta['load_start']}, at end {meta['load_end']}. fio runtime {meta['runtime_s']} s per job; "
             f"image {meta['image']} (256 MiB, pre-written); guest 2 vCPUs, 512 MiB; "
             f"{meta['rounds']} round(s), configurations interleaved"
             + (", figures are medians (min-max in brackets). " if meta["rounds"] > 1 else ". ") +
             "Ratio: the bridge against the better QEMU built-in on each row (qemu-threads, "
             "qemu-io_uring), as issue 14's goals are stated.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in table:
        target = e["target"] + (" (met)" if e.get("met") else " (NOT met)" if "met" in e else "")
        cells = [e["row"], e["unit"], _cell(e, bk), e["best"], f"{e['ratio']:.2f}", target,
                 *(_cell(e, n) for n in others)]
        if warm:
            cells.append(f"{e['ratio_warm']:.2f}")
        if lever:
            cells.append(f"{e['after_before']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Idle CPU (% of one core, 3 s after boot): " + "; ".join(
        f"{n}: " + ", ".join(f"{k} {v:.1f}" for k, v in c.idle.items()) for n, c in configs.items())]
    for failure in meta.get("failures", []):
        lines += ["", f"FAILED: {failure.splitlines()[0][:500]}"]
    if profile is not None:
        lines += ["", f"## py-spy profile of the bridge (extra {profile.job_key} job, {profile.iops:,.0f} IOPS while "
                  f"sampled, {profile.samples} busy samples = 100 %, {profile.waiting} more waiting in epoll_wait; "
                  "after the sequential jobs, so the image is in the page cache)", ""]
        if profile.error:
            lines.append(profile.error)
        else:
            lines += ["| function | self % | total % |", "|---|---|---|"]
            lines += [f"| `{f}` | {s:.1f} | {t:.1f} |" for f, s, t in profile.top]
    if perf is not None:
        lines += ["", f"## perf: where the bridge's CPU goes (extra {perf.job_key} job, image evicted first)",
                  "", "```", *perf.lines(), "```"]
    return "\n".join(lines) + "\n"


def print_table(table: list[dict[str, Any]], configs: dict[str, ConfigResult], base: str) -> None:
    bk = bridge_key(configs)
    others = [n for n in configs if n != bk]
    head = ["row", bk, "best QEMU", "ratio", "goal", *others]
    widths = [52, 10, 14, 7, 12, *([max(14, len(n)) for n in others])]
    warm = "ratio_warm" in table[0]
    if warm:
        head.append("ratio(warm)")
        widths.append(11)
    lever = "after_before" in table[0]
    if lever:
        head.append("after/before")
        widths.append(12)
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths, strict=True))))
    for e in table:
        target = e["target"] + (" ok" if e.get("met") else " MISS" if "met" in e else "")
        cells = [f"{e['row']} ({e['unit']})", _fmt(e[bk]), e["best"], f"{e['ratio']:.2f}", target,
                 *(_fmt(e[n]) for n in others)]
        if warm:
            cells.append(f"{e['ratio_warm']:.2f}")
        if lever:
            cells.append(f"{e['after_before']:.2f}")
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))))


def plot(path: Path, configs: dict[str, ConfigResult], base: str, title: str) -> bool:
    if not pip_install("matplotlib", "matplotlib"):
        log("matplotlib unavailable: no plot")
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(configs)
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    fig.suptitle(title, fontsize=11)

    def bars(ax, groups: list[str], getter, ylabel: str, log_y: bool = False) -> None:
        n = len(names)
        w = 0.8 / n
        for i, name in enumerate(names):
            vals = [getter(configs[name], g) for g in groups]
            pos = [x + (i - (n - 1) / 2) * w for x in range(len(groups))]
            b = ax.bar(pos, vals, w, label=name)
            ax.bar_label(b, labels=[_fmt(v) for v in vals], fontsize=7)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")

    bars(axes[0][0], ["randread-qd1", "randread-qd32"], lambda c, g: c.jobs[g].iops, "IOPS (4 KiB random read)")
    axes[0][0].set_title("IOPS")
    axes[0][0].legend(fontsize=8)
    bars(axes[0][1], ["seqread", "seqwrite"], lambda c, g: c.jobs[g].mbps, "MB/s (128 KiB, iodepth 8)")
    axes[0][1].set_title("sequential throughput")
    bars(axes[0][2], ["50", "99"], lambda c, g: c.jobs["randread-qd1"].clat_us.get(g, math.nan),
         "completion latency, us")
    axes[0][2].set_title("4 KiB randread iodepth 1: clat p50 / p99")
    for ax, key in ((axes[1][0], "randread-qd1"), (axes[1][1], "randread-qd32")):
        for name in names:
            pct = configs[name].jobs[key].clat_us
            xs = sorted(pct, key=float)
            ax.plot([float(x) for x in xs], [pct[x] for x in xs], marker="o", ms=3, label=name)
        ax.set_xscale("function", functions=(lambda p: -_log10_safe(100 - p), lambda y: 100 - 10 ** (-y)))
        ax.set_xticks([10, 50, 90, 99, 99.9], ["10", "50", "90", "99", "99.9"])
        ax.set_yscale("log")
        ax.set_xlabel("percentile")
        ax.set_ylabel("clat, us")
        ax.set_title(f"clat distribution: {key}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    bars(axes[1][2], [j.key for j in JOBS], lambda c, g: c.jobs[g].per_io_us(c.jobs[g].device_cpu_s),
         "device-side CPU per I/O, us")
    axes[1][2].set_title("CPU/IO: bridge process vs QEMU non-vCPU threads")
    axes[1][2].tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _log10_safe(x: Any) -> Any:
    import numpy as np

    return np.log10(np.clip(x, 1e-3, None))


def machine_description() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 30
    return f"{os.cpu_count()} x {model}, {mem} GiB RAM, Linux {platform.release()}, shared with other jobs"


def bridge_version() -> str:
    """git HEAD of the checkout the bridge runs from, and which bridge/ files differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "bridge"],
                               capture_output=True, text=True, check=False).stdout.split("\n")
    except OSError:
        return "unknown"
    changed = [line[3:] for line in dirty if line.strip()]
    return head + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


# --- main -----------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> int:
    from harness.guest import detect_accel, ensure_images

    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    prefix = BENCH_DIR / f"kvm-{stamp}"
    runtime = args.runtime or (5 if args.quick else 12)
    log("building/finding QEMU and the guest images ...")
    await ensure_images()
    accel = await trio.to_thread.run_sync(detect_accel)
    image = BENCH_DIR / "kvm-bench-256M.img"
    await trio.to_thread.run_sync(prepare_image, image)
    profile: ProfileSpec | None = None
    if args.profile:
        spy = await trio.to_thread.run_sync(py_spy_binary)
        if spy:
            profile = ProfileSpec(py_spy=spy, out_prefix=prefix, job_key=args.profile_job)
        else:
            log("py-spy not installable: --profile ignored")
    variants = [
        Variant("bridge", "vscsi-bridge process over vfio-user (page-cache backing store)", "vfio-user"),
        Variant("qemu-threads", "QEMU virtio-scsi + scsi-hd, cache.direct=true, aio=threads", "builtin", "threads"),
        Variant("qemu-io_uring", "QEMU virtio-scsi + scsi-hd, cache.direct=true, aio=io_uring", "builtin", "io_uring"),
    ]
    if args.cached_builtin:
        variants.append(Variant("qemu-cached", "QEMU virtio-scsi + scsi-hd, cache.direct=false, aio=threads",
                                "builtin", "threads", cached=True))
    if args.warm:
        variants += [
            Variant("bridge-warm", "the bridge, image pre-read into the host page cache", "vfio-user",
                    warm=True),
            Variant("qemu-cached-warm", "QEMU cache.direct=false, aio=threads, image pre-read into the page cache",
                    "builtin", "threads", cached=True, warm=True),
        ]
    if args.poll:
        variants.append(Variant("bridge-poll", "the bridge with polled doorbells (mmapped notify area)",
                                "vfio-user", doorbell="poll"))
    if args.only:
        variants = [v for v in variants if v.name in args.only.split(",")]
    befores = [r for r in (args.before_rev or "").split(",") if r]
    for i, rev in enumerate(befores):  # levers' before and after in one sitting, interleaved
        name = "bridge-before" if i == 0 else f"bridge@{rev}"
        variants.insert(1 + i, Variant(name, f"the bridge as committed at {rev}", "vfio-user", rev=rev))
    source, version = await trio.to_thread.run_sync(export_bridge, args.bridge_rev)
    sources = {v.name: (await trio.to_thread.run_sync(export_bridge, v.rev))[0]
               for v in variants if v.rev}
    if befores:
        version += "; " + ", ".join(f"{v.name}: {v.rev} ({sources[v.name].name})"
                                    for v in variants if v.rev)
    meta = {"timestamp": stamp, "machine": machine_description(), "bridge_version": version, "accel": accel, "load_start": load_avg(),
            "runtime_s": runtime, "image": str(image), "python": sys.version.split()[0],
            "jobs": [j.__dict__ for j in JOBS], "variants": [v.__dict__ for v in variants]}
    log(f"{meta['machine']}; accel {accel}; load {meta['load_start']}; {runtime} s per job; "
        f"{len(variants)} configurations x {len(JOBS)} jobs")
    rounds: dict[str, list[ConfigResult]] = {v.name: [] for v in variants}
    profiled = False
    perf = PerfSpec(out_prefix=prefix, job_key=args.perf_job) if args.perf_job else None
    failures: list[str] = []
    for rnd in range(args.repeat):  # rounds interleave the configurations: drifting load hits all
        for v in variants:
            log(f"=== {v.name}: {v.description}" + (f" (round {rnd + 1}/{args.repeat})" if args.repeat > 1 else ""))
            first_bridge = v.name == "bridge" and rnd == 0
            spec = profile if v.attach == "vfio-user" and not profiled else None  # the first bridge run
            profiled = profiled or spec is not None
            try:
                rounds[v.name].append(await run_variant(v, image, runtime, spec, prefix,
                                                        sources.get(v.name, source),
                                                        perf if first_bridge else None))
            except Exception as e:  # one broken configuration must not lose the others' figures
                while isinstance(e, BaseExceptionGroup) and e.exceptions:  # trio nurseries wrap it
                    e = e.exceptions[0]
                msg = f"{v.name} round {rnd + 1}: {type(e).__name__}: {e}"
                failures.append(msg)
                log("FAILED " + msg[:3000])
    rounds = {n: rs for n, rs in rounds.items() if rs}
    configs = {n: merge_rounds(rs) for n, rs in rounds.items()}
    meta["rounds"] = args.repeat
    meta["failures"] = failures
    meta["load_end"] = load_avg()
    builtin = [n for n in ("qemu-threads", "qemu-io_uring") if n in configs] or [
        n for n in configs if n.startswith("qemu")]
    if bridge_key(configs) not in configs or not builtin:
        log("need the bridge and one built-in configuration for a table; raw results only")
        prefix.with_suffix(".json").write_text(json.dumps(
            {"meta": meta, "configs": {n: _config_json(c) for n, c in configs.items()}}, indent=1))
        return 0
    base = max(builtin, key=lambda n: throughput_score(configs[n]))
    table = build_table(configs, base, builtin)
    add_ranges(table, rounds)
    print()
    print(f"kvm_bench {stamp}  ({meta['machine']}; accel {accel}; load {meta['load_start']} -> "
          f"{meta['load_end']}; base = {base})")
    print_table(table, configs, base)
    if profile is not None:
        print(f"\npy-spy top {len(profile.top)} functions of the bridge (self %, total %), "
              f"{profile.samples} busy samples ({profile.waiting} waiting) during an extra {profile.job_key} job at {profile.iops:,.0f} IOPS "
              "(run after the sequential jobs: the image is in the page cache by then):")
        for f, s, t in profile.top:
            print(f"  {s:5.1f}  {t:5.1f}  {f}")
        if profile.error:
            print("  " + profile.error)
    if perf is not None:
        print(f"\nperf: where the bridge's CPU goes (extra {perf.job_key} job, image evicted first):")
        print("\n".join("  " + line for line in perf.lines()))
    doc = {"meta": meta, "base": base, "table": table,
           "configs": {n: _config_json(c) for n, c in configs.items()},
           "rounds": {n: [_config_json(c) for c in rs] for n, rs in rounds.items()} if args.repeat > 1 else None,
           "profile": None if profile is None else {
               "samples": profile.samples, "waiting_samples": profile.waiting, "iops_while_profiled": profile.iops, "error": profile.error,
               "top": [{"function": f, "self_pct": s, "total_pct": t} for f, s, t in profile.top]},
           "perf": None if perf is None else {k: v for k, v in perf.__dict__.items() if k != "out_prefix"}}
    prefix.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str))
    prefix.with_suffix(".md").write_text(markdown(meta, table, configs, base, profile, perf))
    title = (f"vscsi-bridge vs QEMU virtio-scsi, fio in a TCG guest, {stamp} "
             f"(load {meta['load_start']}; noisy shared machine)")
    plotted = await trio.to_thread.run_sync(plot, prefix.with_suffix(".png"), configs, base, title)
    for failure in failures:
        log("FAILED: " + failure.splitlines()[0][:500])
    log(f"wrote {prefix}.json, {prefix}.md" + (f", {prefix}.png" if plotted else ""))
    return 0


def _config_json(c: ConfigResult) -> dict[str, Any]:
    return {"description": c.description, "boot_s": c.boot_s, "idle_cpu_pct": c.idle,
            "jobs": {k: {**j.__dict__, "device_cpu_us_per_io": j.per_io_us(j.device_cpu_s),
                         "qemu_other_cpu_us_per_io": j.per_io_us(j.qemu_other_cpu_s)}
                     for k, j in c.jobs.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="5 s per job instead of 12")
    p.add_argument("--runtime", type=int, help="seconds per fio job (overrides --quick)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy the bridge during an extra run of --profile-job; print the top 15 functions")
    p.add_argument("--poll", action="store_true",
                   help="also bridge-poll: the bridge with doorbell = \"poll\" (an mmapped notify area)")
    p.add_argument("--profile-job", default="randread-qd32", choices=[j.key for j in JOBS],
                   help="the job --profile repeats while sampling (default randread-qd32)")
    p.add_argument("--cached-builtin", action="store_true",
                   help="also QEMU built-in with cache.direct=false (page cache, like the bridge)")
    p.add_argument("--warm", action="store_true",
                   help="also bridge-warm and qemu-cached-warm: image pre-read into the host page cache")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds over all configurations (interleaved); the table gives medians")
    p.add_argument("--perf-job", choices=[j.key for j in JOBS],
                   help="perf record the bridge during an extra run of this job (image evicted "
                        "first): its CPU split into the interpreter and kernel paths, and the "
                        "floor with no user-space work")
    p.add_argument("--before-rev", metavar="REV",
                   help="also bridge-before: the bridge at REV, interleaved with the rest in each "
                        "round (a lever's before/after in one sitting); REV,REV2,...: also "
                        "bridge@REV2 ... (one lever per step)")
    p.add_argument("--bridge-rev", default="HEAD",
                   help="git revision of bridge/ to run (exported snapshot), or 'worktree' (default HEAD)")
    p.add_argument("--only", help="comma-separated configurations to run (bridge,qemu-threads,...)")
    return trio.run(main_async, p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
