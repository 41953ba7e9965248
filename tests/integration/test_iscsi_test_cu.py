"""libiscsi's iscsi-test-cu SCSI family over SG_IO in one booted guest.

The guest (images/build-guest.sh, libiscsi-bin 1.19's iscsi-test-cu) reaches the
bridge through two virtio-scsi devices over vfio-user, one Target behind both:

- path A (initiator A): LUN 0 = ``lu0`` (writable, 512-byte blocks), LUN 1 = ``ro``
  (read-only);
- path B (initiator B): LUN 0 = the same ``lu0``, so the guest has two SG_IO paths
  (two I_T nexuses) to one LU for the MultipathIO suite.

Every suite of ``iscsi-test-cu -l``'s SCSI family runs except the persistent
reservation ones (test_pr_iscsi_test_cu.py covers those): the data-loss suites
on path A's ``lu0`` (``-d``), ReadOnly on ``ro``, MultipathIO on both paths of
``lu0``, Sanitize with ``-S``. Per-test outcomes come from CUnit's verbose report
(parser shared with the PR test). No test may fail; a test may only skip when it
is in ALLOWED_SKIPS below with the reason it prints and ours.

Further guests run the block-size-sensitive suites on a 4096-byte-block LU and on a
512e LU (512-byte logical, 4096-byte physical blocks), and sg3-utils' sg_xcopy through
EXTENDED COPY within and across LUs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import trio

from bridge.scsi.logical_unit import LogicalUnitSpec
from bridge.scsi.request import InitiatorPort
from bridge.scsi.target import Target
from bridge.vfio_user.server import serve
from bridge.virtio.scsi_device import VirtioScsiPciDevice
from harness.guest import GuestResult, run_guest
from tests.integration.served import run_guest_served
from tests.integration.test_pr_iscsi_test_cu import PR_SUITES, CuReport, parse_cunit

INITIATOR_A = "iqn.2026-11.org.vscsi-bridge:cu-path-a"
INITIATOR_B = "iqn.2026-11.org.vscsi-bridge:cu-path-b"

# `iscsi-test-cu -l` in the guest: the SCSI family is 47 suites; the 8 in PR_SUITES
# are left to test_pr_iscsi_test_cu.py. The remaining 39, each run on the device
# that can exercise it.
DATA_SUITES = (
    "TestUnitReady", "Inquiry", "ReadCapacity10", "ReadCapacity16", "Mandatory",
    "ModeSense6", "ReportSupportedOpcodes", "Read6", "Read10", "Read12", "Read16",
    "Write10", "Write12", "Write16", "WriteVerify10", "WriteVerify12", "WriteVerify16",
    "Verify10", "Verify12", "Verify16", "CompareAndWrite", "WriteSame10", "WriteSame16",
    "Unmap", "GetLBAStatus", "Prefetch10", "Prefetch16", "OrWrite", "WriteAtomic16",
    "ReadDefectData10", "ReadDefectData12", "ReceiveCopyResults", "ExtendedCopy",
    "StartStopUnit", "PreventAllow", "NoMedia",
)  # fmt: skip
# ReceiveCopyResults runs before ExtendedCopy: its CopyStatus test first asks for list
# identifier 1 expecting "no such copy" (24h/00h), but ExtendedCopy.ValidTgtDescr ends
# with a successful copy under list identifier 1 and LIST ID USAGE 00b, whose status
# the copy manager rightly holds (SPC-4 6.18.3) until it is reported.
SUITES = (*DATA_SUITES, "Sanitize", "SanitizeReserved", "ReadOnly", "MultipathIO")
# Sanitize runs as two processes, each with one fnmatch pattern (a comma list would
# register the suite once per pattern, and a passed test's report would then run into
# the next "Suite:" line): "Sanitize" = every test whose name does not end in "d",
# "SanitizeReserved" = BlockEraseReserved and CryptoEraseReserved.
# Sanitize.OverwriteReserved is left out: libiscsi 1.19's test hooks the iSCSI PDU
# queue to corrupt the CDB and has no iSCSI-only guard, so on an SG_IO device
# iscsi-test-cu itself dies with SIGSEGV before sending anything (seen here).
SANITIZE_PATTERNS = (("Sanitize", "SCSI.Sanitize.*[!d]"),
                     ("SanitizeReserved", "SCSI.Sanitize.[BC]*Reserved"))

# Why a test may skip, with the text iscsi-test-cu prints for it ("[SKIPPED] ...").
_REMOVABLE = ("needs a removable medium (eject with START STOP UNIT LOEJ, PREVENT ALLOW "
              "MEDIUM REMOVAL); the bridge's LUs are fixed disks (INQUIRY RMB=0)")
_LBPPB = ("needs more than one logical block per physical block (LBPPB >= 2); "
          "this LU reports one (READ CAPACITY(16) LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT 0); "
          "test_iscsi_test_cu_512e runs them")
_ISCSI = ("drives libiscsi's iSCSI session (PDU hooks that corrupt the CDB, task management, "
          "the async API): iSCSI-only, there is no session on an SG_IO device")
_CRYPTO = ("SANITIZE CRYPTOGRAPHIC ERASE changes a media encryption key; an image or block "
           "device served by the bridge has none, so the service action is not offered "
           "(BLOCK ERASE and OVERWRITE are)")

ALLOWED_SKIPS: dict[str, tuple[str, str]] = {
    # name -> (substring of the [SKIPPED] line, our reason)
    "StartStopUnit.Simple": ("not removable", _REMOVABLE),
    **{f"PreventAllow.{t}": ("not removable", _REMOVABLE)
       for t in ("Simple", "Eject", "ITNexusLoss", "Logout", "WarmReset", "ColdReset",
                 "LUNReset", "2ITNexuses")},
    "Sanitize.CryptoErase": ("CRYPTO_ERASE is not implemented", _CRYPTO),
    **{f"SanitizeReserved.{t}": ("only supported for iSCSI backends", _ISCSI)
       for t in ("BlockEraseReserved", "CryptoEraseReserved")},
    **{f"Sanitize.{t}": ("only supported for iSCSI backends", _ISCSI)
       for t in ("Readonly", "Reservations", "Reset")},
    **{f"MultipathIO.{t}": ("Non-iSCSI multipath", _ISCSI) for t in ("Reset", "CompareAndWriteAsync")},
    **{t: ("LBPPB < 2", _LBPPB)
       for t in ("CompareAndWrite.InvalidDataOutSize", "WriteSame10.UnmapUnaligned",
                 "WriteSame10.InvalidDataOutSize", "WriteSame16.UnmapUnaligned",
                 "WriteSame16.InvalidDataOutSize")},
}  # fmt: skip

# Each suite runs in its own iscsi-test-cu process, so a crash in one cannot hide
# the others; "=== SUITE"/"=== RC" frame each run for parse_cunit.
GUEST_SCRIPT = r"""
vscsi_wait_disks 3 90 || exit 1
vscsi_lsscsi
sg_of() { ls /sys/bus/scsi/devices/$1/scsi_generic 2>/dev/null | head -n1; }
# path A is the host that also has LUN 1 (the read-only LU); path B the other one
ro=$(ls -d /sys/bus/scsi/devices/*:*:*:1 | sed 's,.*/,,' | head -n1)
a=${ro%:*}:0
b=$(ls -d /sys/bus/scsi/devices/*:*:*:0 | sed 's,.*/,,' | grep -v "^$a$" | head -n1)
A=/dev/$(sg_of "$a"); B=/dev/$(sg_of "$b"); RO=/dev/$(sg_of "$ro")
echo "paths: A=$A B=$B RO=$RO"
[ -e "$A" ] && [ -e "$B" ] && [ -e "$RO" ] || exit 1
run() {  # run SUITE TESTS ARGS...
    s=$1; t=$2; shift 2
    echo "=== SUITE $s"; iscsi-test-cu -v -t "$t" "$@" 2>&1; echo "=== RC $?"
}
""" + "".join(f'run {s} SCSI.{s} -d "$A"\n' for s in DATA_SUITES) + "".join(
    f'run {m} "{p}" -d -S "$A"\n' for m, p in SANITIZE_PATTERNS) + r"""run ReadOnly SCSI.ReadOnly -d "$RO"
# MultipathIO.CompareAndWrite (libiscsi 1.19) zeroes LBAs 0-255 with WRITE SAME but
# then compares-and-writes LBAs 0-256 expecting zeros: LBA 256 holds what earlier
# suites wrote, and the bridge rightly answers MISCOMPARE there. Zero it first.
sg_write_same --lba=0 --num=512 "$A" || exit 1
run MultipathIO SCSI.MultipathIO -d "$A" "$B"
"""


def check_report(result: GuestResult, suites: tuple[str, ...], what: str, t0: float,
                 allowed: dict[str, tuple[str, str]] | None = None) -> CuReport:
    """Print the counts and names; assert no failure/crash and only allowed skips."""
    allowed = ALLOWED_SKIPS if allowed is None else allowed
    out = result.output
    print(out)
    assert result.rc == 0, result.console[-4000:]
    report = parse_cunit(out)
    passed, failed, skipped = report.names("passed"), report.names("failed"), report.names("skipped")
    print(f"iscsi-test-cu {what} ({len(suites)} suites): {len(report.outcome)} tests, "
          f"{len(passed)} passed, {len(failed)} failed, {len(skipped)} skipped, "
          f"{report.asserts} asserts; guest {result.elapsed_seconds:.1f} s "
          f"(boot {result.boot_seconds:.1f} s), test {time.monotonic() - t0:.1f} s")
    print("passed:", " ".join(passed))
    print("failed:", " ".join(failed))
    for name in skipped:
        print(f"skipped: {name}: {report.skip_reasons[name]}")
    assert set(report.rcs) == set(suites), set(report.rcs) ^ set(suites)
    assert all(rc == 0 for rc in report.rcs.values()), report.rcs  # no crash, no failure
    assert not failed and report.summary_failed == 0, failed
    assert report.names("unknown") == [], report.outcome
    assert report.summary_tests == len(report.outcome), (report.summary_tests, len(report.outcome))
    unexpected = sorted(set(skipped) - set(allowed))
    assert not unexpected, {n: report.skip_reasons[n] for n in unexpected}
    # an allowed skip of a test that ran and no longer skips: take it off the list
    stale = sorted(n for n in set(allowed) - set(skipped) if n in report.outcome)
    assert not stale, stale
    wrong = {n: r for n, r in report.skip_reasons.items() if allowed[n][0] not in r}
    assert not wrong, wrong  # skipped, but for another reason than the one allowed
    return report


def test_suite_selection_is_the_scsi_family_without_pr() -> None:
    assert len(SUITES) == len(set(SUITES)) == 40  # 39 suites, Sanitize in two runs
    assert not set(SUITES) & set(PR_SUITES)
    assert {n.split(".")[0] for n in ALLOWED_SKIPS} <= set(SUITES)
    assert {m for m, _p in SANITIZE_PATTERNS} <= set(SUITES)
    assert set(SUITES_4K) <= set(DATA_SUITES)


@pytest.mark.booted
async def test_iscsi_test_cu_scsi_family(run_dir: Path) -> None:
    target = Target(
        [LogicalUnitSpec(name="lu0", path=str(run_dir / "lu0.img"), size=64 << 20),
         LogicalUnitSpec(name="ro", path=str(run_dir / "ro.img"), size=16 << 20, read_only=True)],
        {INITIATOR_A: {0: "lu0", 1: "ro"}, INITIATOR_B: {0: "lu0"}},
    )
    dev_a = VirtioScsiPciDevice(target, InitiatorPort(INITIATOR_A), num_queues=1)
    dev_b = VirtioScsiPciDevice(target, InitiatorPort(INITIATOR_B), num_queues=1)
    sock_a, sock_b = str(run_dir / "a.sock"), str(run_dir / "b.sock")
    path_b = json.dumps({"driver": "vfio-user-pci", "id": "vscsi1",
                         "socket": {"path": sock_b, "type": "unix"}}, separators=(",", ":"))
    t0 = time.monotonic()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, sock_a, dev_a)
            await nursery.start(serve, sock_b, dev_b)
            result = await run_guest(GUEST_SCRIPT, attach="vfio-user", socket=sock_a, smp=1,
                                     mem="256M", timeout=560, extra_args=("-device", path_b))
            nursery.cancel_scope.cancel()
    finally:
        target.close()
    report = check_report(result, SUITES, "SCSI family", t0)
    assert set(report.names("skipped")) == set(ALLOWED_SKIPS)  # the list is exact
    # the suites that matter ran with real assertions, and both paths and the
    # read-only LU were exercised
    for name in ("Read10.Simple", "Write16.Simple", "Verify16.Mismatch", "CompareAndWrite.Miscompare",
                 "WriteSame16.Unmap", "Unmap.Simple", "MultipathIO.Simple",
                 "MultipathIO.CompareAndWrite"):
        assert report.outcome.get(name) == "passed", (name, report.outcome.get(name))
    assert report.asserts >= 40000, report.asserts


# 4096-byte logical blocks: the suites whose transfers scale with the block size.
# iscsi-test-cu mallocs a scratch buffer of 65536 blocks (256 MiB here), hence 768 MiB
# of guest RAM (with 256 MiB the malloc fails and the Write suites crash in the
# client). GetLBAStatus.UnmapSingle writes 257 blocks (1028 KiB) in one WRITE(10)
# regardless of the Block Limits page; the device's max_sectors (4 MiB) carries it.
SUITES_4K = (
    "ReadCapacity16", "Read10", "Read16", "Write10", "Write16", "WriteVerify16", "Verify16",
    "CompareAndWrite", "WriteSame16", "Unmap", "GetLBAStatus",
)  # fmt: skip
GUEST_SCRIPT_4K = r"""
vscsi_wait_disks 1 90 || exit 1
sg=/dev/$(ls /sys/bus/scsi/devices/*:*:*:0/scsi_generic | head -n1)
echo "logical block size: $(cat /sys/block/sda/queue/logical_block_size)"
""" + "".join(
    f'echo "=== SUITE {s}"; iscsi-test-cu -v -d -t "{t}" "$sg" 2>&1; echo "=== RC $?"\n'
    for s, t in ((s, f"SCSI.{s}") for s in SUITES_4K)
)


@pytest.mark.booted
async def test_iscsi_test_cu_4096_byte_blocks(run_dir: Path) -> None:
    target = Target([LogicalUnitSpec(name="lu4k", path=str(run_dir / "lu4k.img"), size=64 << 20,
                                     block_size=4096)], {INITIATOR_A: {0: "lu4k"}})
    device = VirtioScsiPciDevice(target, InitiatorPort(INITIATOR_A), num_queues=1)
    sock = str(run_dir / "a.sock")
    t0 = time.monotonic()
    result = await run_guest_served(target, device, sock, GUEST_SCRIPT_4K, smp=1, mem="768M",
                                    timeout=560)
    report = check_report(result, SUITES_4K, "4096-byte blocks", t0)
    assert "logical block size: 4096" in result.output
    for name in ("Write10.Simple", "Verify16.Mismatch", "CompareAndWrite.Miscompare",
                 "WriteSame16.Unmap", "Unmap.Simple", "GetLBAStatus.Simple",
                 "GetLBAStatus.UnmapSingle"):
        assert report.outcome.get(name) == "passed", (name, report.outcome.get(name))


# 512e: 512-byte logical blocks on 4096-byte physical blocks (LBPPB 8, READ CAPACITY(16)
# exponent 3), the layout of most disks sold today. The suites that look at the
# physical block size run here; the LBPPB >= 2 tests skipped at 512/512 must pass.
SUITES_512E = (
    "ReadCapacity16", "Read10", "Write10", "CompareAndWrite", "WriteSame10", "WriteSame16",
    "Unmap", "GetLBAStatus",
)  # fmt: skip
_LBPPB_TESTS = ("CompareAndWrite.InvalidDataOutSize", "WriteSame10.UnmapUnaligned",
                "WriteSame10.InvalidDataOutSize", "WriteSame16.UnmapUnaligned",
                "WriteSame16.InvalidDataOutSize")
# GetLBAStatus.UnmapSingle is not run at 512e: libiscsi 1.19's second loop (still so
# upstream) unmaps LBAs 0..i-1, asks GET LBA STATUS for LBA i+1 and requires the first
# descriptor to start at LBA i+LBPPB; SBC-3 5.4 has it start at the LBA asked for, which
# the bridge does (the test passes at 512 and 4096, where LBPPB is 1).
GUEST_SCRIPT_512E = r"""
vscsi_wait_disks 1 90 || exit 1
sg=/dev/$(ls /sys/bus/scsi/devices/*:*:*:0/scsi_generic | head -n1)
echo "block sizes: $(cat /sys/block/sda/queue/logical_block_size)/$(cat /sys/block/sda/queue/physical_block_size)"
""" + "".join(
    f'echo "=== SUITE {s}"; iscsi-test-cu -v -d -t "{t}" "$sg" 2>&1; echo "=== RC $?"\n'
    for s, t in ((s, "SCSI.GetLBAStatus.[SB]*" if s == "GetLBAStatus" else f"SCSI.{s}")
                 for s in SUITES_512E)
)


@pytest.mark.booted
async def test_iscsi_test_cu_512e(run_dir: Path) -> None:
    target = Target([LogicalUnitSpec(name="lu512e", path=str(run_dir / "lu512e.img"),
                                     size=64 << 20, block_size=512, physical_block_size=4096)],
                    {INITIATOR_A: {0: "lu512e"}})
    device = VirtioScsiPciDevice(target, InitiatorPort(INITIATOR_A), num_queues=1)
    sock = str(run_dir / "a.sock")
    t0 = time.monotonic()
    result = await run_guest_served(target, device, sock, GUEST_SCRIPT_512E, smp=1, mem="256M",
                                    timeout=560)
    allowed = {n: r for n, r in ALLOWED_SKIPS.items()
               if n.split(".")[0] in SUITES_512E and n not in _LBPPB_TESTS}
    allowed["CompareAndWrite.InvalidDataOutSize"] = ("only supported for iSCSI backends", _ISCSI)
    report = check_report(result, SUITES_512E, "512e (512/4096)", t0, allowed)
    assert "block sizes: 512/4096" in result.output
    assert "GetLBAStatus.UnmapSingle" not in report.outcome
    for name in (*_LBPPB_TESTS[1:], "ReadCapacity16.Simple", "Unmap.Simple", "GetLBAStatus.Simple"):
        assert report.outcome.get(name) == "passed", (name, report.outcome.get(name))


# EXTENDED COPY from a real client: sg3-utils' sg_xcopy (in the guest image) reads the
# device identification and RECEIVE COPY RESULTS, then sends EXTENDED COPY (LID1) with
# CSCD E4h descriptors and 02h segments. A copy within LU 0 and one from LU 0 to LU 1,
# each checked by reading both ranges back through the block layer.
GUEST_SCRIPT_XCOPY = r"""
vscsi_wait_disks 2 90 || exit 1
sg_of() { ls /sys/bus/scsi/devices/$1/scsi_generic | head -n1; }
bd_of() { ls /sys/bus/scsi/devices/$1/block | head -n1; }
h=$(ls -d /sys/bus/scsi/devices/*:*:*:0 | sed 's,.*/,,' | head -n1); h=${h%:*}
SG0=/dev/$(sg_of $h:0); SG1=/dev/$(sg_of $h:1); SD0=/dev/$(bd_of $h:0); SD1=/dev/$(bd_of $h:1)
echo "devices: $SG0 $SD0 $SG1 $SD1"
dd if=/dev/urandom of=/tmp/src bs=512 count=2048 2>/dev/null
dd if=/tmp/src of=$SD0 bs=512 seek=100 oflag=direct conv=fsync 2>/dev/null || exit 1
sg_xcopy if=$SG0 of=$SG0 bs=512 skip=100 seek=20000 count=2048 || exit 2
sg_xcopy if=$SG0 of=$SG1 bs=512 skip=100 seek=300 count=2048 || exit 3
echo 3 >/proc/sys/vm/drop_caches
a=$(md5sum </tmp/src)
b=$(dd if=$SD0 bs=512 skip=20000 count=2048 iflag=direct 2>/dev/null | md5sum)
c=$(dd if=$SD1 bs=512 skip=300 count=2048 iflag=direct 2>/dev/null | md5sum)
echo "source $a within $b across $c"
[ "$a" = "$b" ] && [ "$a" = "$c" ] && echo "XCOPY-DATA-OK"
"""


@pytest.mark.booted
async def test_sg_xcopy_copies_data_in_the_guest(run_dir: Path) -> None:
    target = Target(
        [LogicalUnitSpec(name="src", path=str(run_dir / "src.img"), size=32 << 20),
         LogicalUnitSpec(name="dst", path=str(run_dir / "dst.img"), size=32 << 20)],
        {INITIATOR_A: {0: "src", 1: "dst"}},
    )
    opcodes: list[int] = []  # what reached the target, to know the copy was an XCOPY
    submit = target.submit

    def spy(req):  # type: ignore[no-untyped-def]
        opcodes.append(req.cdb[0])
        return submit(req)

    target.submit = spy  # type: ignore[method-assign]
    device = VirtioScsiPciDevice(target, InitiatorPort(INITIATOR_A), num_queues=1)
    sock = str(run_dir / "a.sock")
    result = await run_guest_served(target, device, sock, GUEST_SCRIPT_XCOPY, smp=1, mem="256M",
                                    timeout=300)
    src = (run_dir / "src.img").read_bytes()
    dst = (run_dir / "dst.img").read_bytes()
    print(result.output)
    assert result.rc == 0, result.console[-3000:]
    assert "XCOPY-DATA-OK" in result.output
    # and on the images themselves, not only as the guest reads them back
    assert src[100 * 512 : 2148 * 512] == src[20000 * 512 : 22048 * 512] == dst[300 * 512 : 2348 * 512]
    assert src[100 * 512 : 2148 * 512] != bytes(2048 * 512)
    assert opcodes.count(0x83) >= 2, sorted(set(opcodes))  # EXTENDED COPY, once per sg_xcopy
