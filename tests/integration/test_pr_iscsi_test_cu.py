"""libiscsi's iscsi-test-cu persistent-reservation suites over SG_IO in a booted guest.

The guest (images/build-guest.sh, libiscsi-bin's iscsi-test-cu) sees the bridge's
LU through virtio-scsi over vfio-user and runs every PERSISTENT RESERVE IN/OUT
and RESERVE(6) suite on /dev/sg0 (SG_IO). Per-test results are read from CUnit's
verbose report. Tests that need a second iSCSI login (CHECK_FOR_ISCSI) pass
without running and print "[SKIPPED] ... only supported for iSCSI backends";
those, and only those, may be skipped: they are listed by name below. Their
two-initiator checks are covered by test_pr_guests.py (three guests, three nexuses).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from bridge.scsi.logical_unit import LogicalUnitSpec
from bridge.scsi.request import InitiatorPort
from bridge.scsi.target import Target
from bridge.vfio_user.server import serve
from bridge.virtio.scsi_device import VirtioScsiPciDevice
from harness.guest import run_guest

INITIATOR = "iqn.2026-11.org.vscsi-bridge:iscsi-test-cu"
# `iscsi-test-cu -l` in the guest (libiscsi 1.19, Debian 12): every suite about
# persistent reservations or SPC-2 RESERVE/RELEASE. SCSI.Sanitize.Reservations is
# left out: it needs SANITIZE (-S) and an iSCSI login for its second initiator.
PR_SUITES = (
    "PrinReadKeys", "PrinServiceactionRange", "PrinReportCapabilities", "ProutRegister",
    "ProutReserve", "ProutClear", "ProutPreempt", "Reserve6",
)  # fmt: skip
_TYPES = ("EA", "WE", "EARO", "WERO", "EAAR", "WEAR")
# CHECK_FOR_ISCSI: these open a second iSCSI session (another initiator name).
EXPECTED_SKIPS = frozenset(
    [f"ProutReserve.Access{t}" for t in _TYPES]
    + [f"ProutReserve.Ownership{t}" for t in _TYPES]
    + ["ProutPreempt.RemoveRegistration"]
    + [f"Reserve6.{t}" for t in ("2Initiators", "Logout", "ITNexusLoss", "TargetColdReset",
                                 "TargetWarmReset", "LUNReset")]
)
ISCSI_ONLY = "only supported for iSCSI backends"

GUEST_SCRIPT = "vscsi_wait_disks 1 60 || exit 1\n" + "".join(
    f"echo '=== SUITE {s}'; iscsi-test-cu -d -v -t SCSI.{s} /dev/sg0 2>&1; echo \"=== RC $?\"\n"
    for s in PR_SUITES
)


@dataclass
class CuReport:
    outcome: dict[str, str] = field(default_factory=dict)  # "Suite.Test" -> passed/failed/skipped
    skip_reasons: dict[str, str] = field(default_factory=dict)
    summary_tests: int = 0  # "tests" row of every Run Summary, column Ran
    summary_failed: int = 0
    asserts: int = 0
    rcs: dict[str, int] = field(default_factory=dict)

    def names(self, outcome: str) -> list[str]:
        return sorted(n for n, o in self.outcome.items() if o == outcome)


_TEST_RE = re.compile(r"^  Test: (\S+) \.\.\.(.*?)(?=^  Test: |^Run Summary:|\Z)", re.M | re.S)
_SUMMARY_RE = re.compile(r"^\s+tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", re.M)
_ASSERTS_RE = re.compile(r"^\s+asserts\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", re.M)


def parse_cunit(output: str) -> CuReport:
    """Per-test outcome from CUnit's verbose ("basic") report, one block per suite run."""
    report = CuReport()
    for block in re.split(r"^=== SUITE ", output, flags=re.M)[1:]:
        suite = block.split("\n", 1)[0].strip()
        rc = re.search(r"^=== RC (\d+)", block, re.M)
        report.rcs[suite] = int(rc.group(1)) if rc else -1
        for m in _TEST_RE.finditer(block):
            name, body = f"{suite}.{m.group(1)}", m.group(2)
            skipped = re.search(r"\[SKIPPED\]\s*(.*)", body)
            if "FAILED" in body:
                report.outcome[name] = "failed"
            elif skipped:
                report.outcome[name] = "skipped"
                report.skip_reasons[name] = skipped.group(1).strip()
            elif re.search(r"passed\s*$", body):
                report.outcome[name] = "passed"
            else:
                report.outcome[name] = "unknown"
        for s in _SUMMARY_RE.finditer(block):
            report.summary_tests += int(s.group(2))
            report.summary_failed += int(s.group(4))
        for a in _ASSERTS_RE.finditer(block):
            report.asserts += int(a.group(2))
    return report


def test_parse_cunit_outcomes() -> None:
    sample = (
        "=== SUITE ProutReserve\nSuite: ProutReserve\n  Test: Simple ...passed\n"
        "  Test: AccessEA ...    [SKIPPED] This PERSISTENT RESERVE test is only supported for iSCSI "
        "backends\npassed\n  Test: AccessWE ...FAILED\n    1. test.c:10  - ret == 0\n"
        "Run Summary:    Type  Total    Ran Passed Failed Inactive\n"
        "              suites      1      1    n/a      0        0\n"
        "               tests      3      3      2      1        0\n"
        "             asserts      9      9      8      1      n/a\n=== RC 1\n"
    )
    r = parse_cunit(sample)
    assert r.outcome == {"ProutReserve.Simple": "passed", "ProutReserve.AccessEA": "skipped",
                         "ProutReserve.AccessWE": "failed"}
    assert ISCSI_ONLY in r.skip_reasons["ProutReserve.AccessEA"]
    assert (r.summary_tests, r.summary_failed, r.asserts, r.rcs) == (3, 1, 9, {"ProutReserve": 1})


@pytest.mark.booted
async def test_iscsi_test_cu_reservation_suites(run_dir: Path) -> None:
    target = Target([LogicalUnitSpec(name="lu0", path=str(run_dir / "lu0.img"), size=64 << 20)],
                    {INITIATOR: {0: "lu0"}})
    device = VirtioScsiPciDevice(target, InitiatorPort(INITIATOR), num_queues=1)
    sock = str(run_dir / "bridge.sock")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, sock, device)
            result = await run_guest(GUEST_SCRIPT, attach="vfio-user", socket=sock, smp=1,
                                     mem="256M", timeout=400)
            nursery.cancel_scope.cancel()
        status = target.logical_unit("lu0").reservations.status()
    finally:
        target.close()
    out = result.output
    print(out)
    assert result.rc == 0, result.console[-4000:]
    report = parse_cunit(out)
    passed, failed, skipped = report.names("passed"), report.names("failed"), report.names("skipped")
    print(f"iscsi-test-cu: {len(report.outcome)} tests, {len(passed)} passed, {len(failed)} failed, "
          f"{len(skipped)} skipped, {report.asserts} asserts; guest run {result.elapsed_seconds:.1f} s")
    print("passed:", " ".join(passed))
    print("skipped:", " ".join(skipped))
    assert set(report.rcs) == set(PR_SUITES), report.rcs  # every suite ran to its summary
    assert all(rc == 0 for rc in report.rcs.values()), report.rcs
    assert not failed and report.summary_failed == 0, failed
    assert report.names("unknown") == [], report.outcome
    assert set(skipped) == EXPECTED_SKIPS, set(skipped) ^ EXPECTED_SKIPS
    assert all(ISCSI_ONLY in report.skip_reasons[n] for n in skipped), report.skip_reasons
    assert report.summary_tests == len(report.outcome), (report.summary_tests, len(report.outcome))
    # the suites that do run on SG_IO, each one with real assertions
    assert set(passed) == {
        "PrinReadKeys.Simple", "PrinReadKeys.Truncate", "PrinServiceactionRange.Range",
        "PrinReportCapabilities.Simple", "ProutRegister.Simple", "ProutReserve.Simple",
        "ProutClear.Simple", "Reserve6.Simple",
    }, passed
    assert report.asserts >= 80, report.asserts
    # the suites clean up after themselves: nothing is left registered or reserved
    assert status["registrants"] == [] and status["holder"] is None and status["spc2_holder"] is None, status
