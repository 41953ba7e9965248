"""Proves the booted-guest harness with QEMU's BUILT-IN virtio-scsi (no bridge involved).

A guest booted from images/ sees a 64 MiB sparse raw image through
virtio-scsi-pci + scsi-hd (qemu-configs/builtin-virtio-scsi.args); sg_inq,
sg_readcap and a direct-I/O write and read-back run inside it, and the written
block is checked in the image file on the host afterwards.
"""

from __future__ import annotations

import re

import pytest
import trio

from harness.guest import (
    CONFIG_DIR,
    disk_check_script,
    ensure_images,
    guest_session,
    load_args,
    newc_archive,
    run_guest,
    script_output,
)

PATTERN = "VSCSI-GUEST-PATTERN-"
PATTERN_LBA = 2048  # 512-byte blocks: offset 1 MiB

GUEST_SCRIPT = disk_check_script(PATTERN, PATTERN_LBA, wait_seconds=30)


@pytest.mark.booted
async def test_builtin_virtio_scsi_guest(sparse_image) -> None:
    image = sparse_image(64 << 20)
    result = await run_guest(GUEST_SCRIPT, attach="builtin", image=image, timeout=240)
    out = result.output
    print(out)
    print(f"boot to script: {result.boot_seconds:.1f} s, whole run {result.elapsed_seconds:.1f} s")
    assert result.rc == 0, out
    # The driver bound and the one LUN appeared as a disk (type 0) with an sg node.
    assert re.search(r"^\[\d+:0:0:0\] type=0 QEMU QEMU_HARDDISK \S+ /dev/sda /dev/sg\d+ 67108864$",
                     out, re.MULTILINE), out  # fmt: skip
    assert re.search(r"Vendor identification: QEMU\b", out), out
    assert re.search(r"Product identification: QEMU HARDDISK", out), out
    assert "Last LBA=131071 (0x1ffff), Number of logical blocks=131072" in out, out
    assert "Logical block length=512 bytes" in out, out
    m = re.search(r"wrote (\w+) read (\w+)", out)
    assert m and m.group(1) == m.group(2), out
    assert "READBACK-OK" in out
    # The write went through to the image file on the host.
    with image.open("rb") as f:
        f.seek(PATTERN_LBA * 512)
        block = f.read(4096)
    assert block.startswith(f"{PATTERN}00000000000\n".encode())
    assert block.endswith(f"{PATTERN}00000000127\n".encode())


@pytest.mark.booted
async def test_guest_session_runs_commands_and_qmp(sparse_image) -> None:
    image = sparse_image(16 << 20)
    async with guest_session(attach="builtin", image=image, smp=1) as guest:
        first = await guest.run("vscsi_wait_disks 1 30 && cat /sys/block/sda/size")
        assert first.rc == 0, first.output
        assert first.output.strip() == str((16 << 20) // 512)
        failing = await guest.run("echo to-stderr >&2; exit 7")
        assert failing.rc == 7
        assert failing.output == "to-stderr\n"
        status = await guest.qmp("query-status")
        assert isinstance(status, dict) and status["status"] == "running"
        # A reset reboots the guest (QEMU stays up) and the session follows it.
        await guest.run("echo kept >/tmp/marker")
        await guest.qmp("system_reset")
        after = await guest.run("cat /tmp/marker 2>/dev/null || echo fresh-boot")
        assert after.output == "fresh-boot\n", after.output
        assert guest.process.returncode is None
    assert guest.process.returncode is not None


def test_newc_archive_layout() -> None:
    data = newc_archive({"script.sh": b"echo hi\n"})
    assert data.startswith(b"070701")
    assert len(data) % 512 == 0
    # Header: 6-byte magic + 13 8-hex-digit fields; filesize is field 7, namesize field 12.
    fields = [int(data[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
    assert fields[1] == 0o100755 and fields[6] == 8 and fields[11] == len(b"script.sh\0")
    name_end = 110 + fields[11]
    assert data[110:name_end] == b"script.sh\0"
    body_start = name_end + (-name_end % 4)
    assert data[body_start : body_start + 8] == b"echo hi\n"
    assert b"TRAILER!!!\0" in data


def test_qemu_configs_fill_every_placeholder() -> None:
    values = {k: f"<{k}>" for k in
              ("ACCEL", "CPU", "SMP", "MEM", "KERNEL", "INITRD", "APPEND", "SERIAL", "SOCKET",
               "IMAGE", "AIO")}  # fmt: skip
    for name in ("guest.args", "vfio-user.args", "builtin-virtio-scsi.args"):
        args = load_args(name, values)
        assert args and not any("@" in a for a in args), name
    vfio = load_args("vfio-user.args", values)
    assert "memory-backend-memfd,id=mem0,size=<MEM>,share=on" in vfio
    assert '{"driver":"vfio-user-pci","id":"vscsi0","socket":{"path":"<SOCKET>","type":"unix"}}' in vfio
    with pytest.raises(KeyError):
        load_args("guest.args", {})
    assert (CONFIG_DIR / "guest.args").read_text().startswith("#")


def test_script_output_between_markers() -> None:
    console = "boot noise\nVSCSI-BEGIN\nline 1\nline 2\nVSCSI-EXIT 3\nVSCSI-POWEROFF\n"
    assert script_output(console) == "line 1\nline 2\n"
    assert script_output("no markers") == ""


TOOLS_SCRIPT = r"""
vscsi_wait_disks 1 30
echo "--- fio"
fio --name=verify --filename=/dev/sda --direct=1 --ioengine=libaio --rw=randwrite --bs=4k \
    --size=8M --offset_increment=8M --iodepth=32 --numjobs=2 --verify=crc32c \
    --group_reporting >/tmp/fio.out 2>&1
echo "fio-rc $?"
grep -E 'err=|IOPS' /tmp/fio.out
echo "--- iscsi-test-cu"
iscsi-test-cu -d -s -t ALL.Inquiry /dev/sg0 2>&1 | grep -E '^ +tests'
echo "--- ext4"
mkfs.ext4 -q -F /dev/sda && mount -t ext4 /dev/sda /mnt && echo data >/mnt/file && umount /mnt
e2fsck -fn /dev/sda >/dev/null 2>&1; echo "e2fsck-rc $?"
"""


@pytest.mark.booted
async def test_guest_tools_fio_iscsi_test_cu_ext4(sparse_image) -> None:
    """The initramfs' tools run: fio (verify), iscsi-test-cu over SG_IO, mkfs/mount/fsck."""
    image = sparse_image(64 << 20)
    result = await run_guest(TOOLS_SCRIPT, attach="builtin", image=image, timeout=400)
    out = result.output
    print(out)
    assert result.rc == 0, out
    assert "fio-rc 0" in out and re.search(r"jobs=2\): err= 0", out), out
    assert re.search(r"write: IOPS=", out) and re.search(r"read: IOPS=", out), out
    m = re.search(r"^ +tests +(\d+) +(\d+) +(\d+) +(\d+)", out, re.MULTILINE)
    assert m and int(m.group(2)) > 0, out  # iscsi-test-cu ran its Inquiry tests over /dev/sg0
    assert "e2fsck-rc 0" in out, out


async def test_qemu_accepts_vfio_user_config(tmp_path) -> None:
    """QEMU 11 parses qemu-configs/vfio-user.args and gets as far as connecting to the socket."""
    qemu, image = await ensure_images()
    sock = tmp_path / "absent.sock"
    values = {
        "ACCEL": "tcg", "CPU": "max", "SMP": "1", "MEM": "128M", "KERNEL": str(image.kernel),
        "INITRD": str(image.initramfs), "APPEND": "console=ttyS0", "SERIAL": "none",
        "SOCKET": str(sock),
    }  # fmt: skip
    argv = [str(qemu), *load_args("guest.args", values), *load_args("vfio-user.args", values)]
    proc = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert f"Failed to connect to '{sock}'" in err, err


def test_detect_accel(monkeypatch) -> None:
    from pathlib import Path

    from harness import guest

    guest.detect_accel.cache_clear()
    monkeypatch.setenv("VSCSI_ACCEL", "kvm")
    assert guest.detect_accel() == "kvm"
    guest.detect_accel.cache_clear()
    monkeypatch.delenv("VSCSI_ACCEL")
    if Path("/sys/module/kvm_pvm").exists() or not Path("/dev/kvm").exists():
        # A PVM host's /dev/kvm runs only PVM guest kernels: TCG without a probe boot.
        assert guest.detect_accel() == "tcg,thread=multi"
    guest.detect_accel.cache_clear()


def test_fio_layer_only_for_scripts_that_use_fio() -> None:
    from harness.guest import _wants_fio

    assert _wants_fio("fio --name=x")
    assert _wants_fio("vscsi_wait_disks 1 && fio --rw=read")
    assert not _wants_fio("sg_inq /dev/sg0 # no profiler here")
    assert not _wants_fio("echo fiona")


@pytest.mark.booted
async def test_timeout_kills_the_guest() -> None:
    """A guest past its timeout is killed at once (not left to finish a 10-minute sleep)."""
    from harness.guest import GuestTimeout

    await ensure_images()
    start = trio.current_time()
    with pytest.raises(GuestTimeout, match="did not finish within 5 s"):
        await run_guest("sleep 600", attach="none", timeout=5)
    assert trio.current_time() - start < 120
