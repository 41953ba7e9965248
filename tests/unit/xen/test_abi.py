"""The Python ABI definitions against Xen's own headers (Debian libxen-dev), compiled with gcc.

Installing libxen-dev is the CI's job; without the headers (or gcc) this test
fails and says so.
"""

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from bridge.xen import linux_platform as lp
from bridge.xen import ring, vscsiif, xs_wire
from bridge.xen.xenbus import XenbusState

SOURCE = Path(__file__).resolve().parents[2] / "xen_abi" / "vscsiif_abi.c"
HEADER = Path("/usr/include/xen/io/vscsiif.h")


@pytest.fixture(scope="module")
def abi(tmp_path_factory) -> dict[str, str]:
    if shutil.which("gcc") is None:
        pytest.fail("gcc is not installed: the ABI check cannot be built")
    if not HEADER.exists():
        pytest.fail(f"{HEADER} missing: install Debian's libxen-dev (apt-get install libxen-dev)")
    exe = tmp_path_factory.mktemp("abi") / "vscsiif_abi"
    build = subprocess.run(["gcc", "-Wall", "-Werror", "-o", str(exe), str(SOURCE)],
                           capture_output=True, text=True)
    if build.returncode:
        pytest.fail(f"building {SOURCE.name} failed:\n{build.stderr}")
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def num(abi, key) -> int:
    return int(abi[key])


def test_vscsiif_structs(abi):
    assert num(abi, "request.size") == vscsiif.REQUEST_SIZE
    assert num(abi, "response.size") == vscsiif.RESPONSE_SIZE == vscsiif.RESPONSE.size
    assert num(abi, "segment.size") == vscsiif.SEGMENT.size
    for field, off in vscsiif.REQUEST_OFFSETS.items():
        assert num(abi, f"request.{field}") == off, field
    for field, off in vscsiif.RESPONSE_OFFSETS.items():
        assert num(abi, f"response.{field}") == off, field
    for field, off in vscsiif.SEGMENT_OFFSETS.items():
        assert num(abi, f"segment.{field}") == off, field
    # the struct formats really put the fields there
    raw = vscsiif.encode_request(vscsiif.VscsiifRequest(
        0x1122, 0x33, 0x44, bytes(range(16)), 0x5566, 0x7788, 0x99AA, 0xBBCC, 0xDDEE, 0x01, 0x02,
        (vscsiif.Segment(0x12345678, 0x9ABC, 0xDEF0),) * 26))
    assert raw[num(abi, "request.ref_rqid"):][:2] == bytes((0xEE, 0xDD))
    assert raw[num(abi, "request.nr_segments")] == 0x02
    seg = num(abi, "request.seg")
    assert raw[seg:seg + 8] == bytes.fromhex("78563412bc9af0de")
    rsp = vscsiif.encode_response(vscsiif.VscsiifResponse(7, -2, b"\x70", 0x01020304))
    assert rsp[num(abi, "response.rslt"):][:4] == (-2).to_bytes(4, "little", signed=True)
    assert rsp[num(abi, "response.residual_len"):][:4] == bytes((4, 3, 2, 1))
    assert rsp[num(abi, "response.sense_len")] == 1


def test_vscsiif_constants(abi):
    for name in ("VSCSIIF_ACT_SCSI_CDB", "VSCSIIF_ACT_SCSI_ABORT", "VSCSIIF_ACT_SCSI_RESET",
                 "VSCSIIF_ACT_SCSI_SG_PRESET", "VSCSIIF_SG_TABLESIZE", "VSCSIIF_MAX_COMMAND_SIZE",
                 "VSCSIIF_SENSE_BUFFERSIZE", "VSCSIIF_PAGE_SIZE", "VSCSIIF_SG_GRANT",
                 "XEN_VSCSIIF_RSLT_RESET_SUCCESS", "XEN_VSCSIIF_RSLT_RESET_FAILED"):
        assert num(abi, name) == getattr(vscsiif, name), name
    assert num(abi, "VSCSIIF_SG_PER_PAGE") == vscsiif.SG_PER_PAGE
    for host in vscsiif.RsltHost:
        assert num(abi, f"RsltHost.{host.name}") == host, host.name
    assert len([k for k in abi if k.startswith("RsltHost.")]) == len(vscsiif.RsltHost)
    r = vscsiif.rslt(vscsiif.RsltHost.ERROR, 2)
    assert r == 0x00070002
    assert num(abi, "XEN_VSCSIIF_RSLT_HOST(0x00070002)") == (r >> 16) & 0xFF
    assert num(abi, "XEN_VSCSIIF_RSLT_STATUS(0x00070002)") == r & 0xFF


def test_ring_layout(abi):
    assert num(abi, "ring.size") == ring.VSCSIIF_RING_SIZE
    assert num(abi, "sring.entry_size") == vscsiif.REQUEST_SIZE
    for field, off in ring.SRING_OFFSETS.items():
        assert num(abi, f"sring.{field}") == off, field
    assert ring.SRING_HEADER_SIZE == num(abi, "sring.ring")


def test_xenstore_wire(abi):
    assert num(abi, "xsd_sockmsg.size") == xs_wire.HEADER.size
    for i, field in enumerate(("type", "req_id", "tx_id", "len")):
        assert num(abi, f"xsd_sockmsg.{field}") == 4 * i
    assert num(abi, "XENSTORE_PAYLOAD_MAX") == xs_wire.XENSTORE_PAYLOAD_MAX
    assert num(abi, "XENSTORE_ABS_PATH_MAX") == xs_wire.XENSTORE_ABS_PATH_MAX
    for t in xs_wire.XsType:
        assert num(abi, f"XsType.{t.name}") == t, t.name
    errors = [abi[f"xsd_errors.{i}"] for i in range(len(xs_wire.XSD_ERRORS))]
    assert tuple(errors) == xs_wire.XSD_ERRORS
    for s in XenbusState:
        assert num(abi, f"XenbusState.{s.name}") == s, s.name


def test_gntdev_and_evtchn_ioctls(abi):
    for name in ("IOCTL_GNTDEV_MAP_GRANT_REF", "IOCTL_GNTDEV_UNMAP_GRANT_REF",
                 "IOCTL_GNTDEV_SET_MAX_GRANTS", "IOCTL_GNTDEV_GRANT_COPY",
                 "IOCTL_EVTCHN_BIND_INTERDOMAIN", "IOCTL_EVTCHN_UNBIND", "IOCTL_EVTCHN_NOTIFY"):
        assert num(abi, name) == getattr(lp, name), name
    assert num(abi, "map_grant_ref.refs") == lp.MAP_GRANT_REF.size
    assert num(abi, "map_grant_ref.index") == 8
    assert num(abi, "grant_ref.size") == lp.GRANT_REF.size
    assert num(abi, "unmap_grant_ref.size") == lp.UNMAP_GRANT_REF.size
    assert num(abi, "unmap_grant_ref.count") == 8
    assert num(abi, "grant_copy.size") == ctypes.sizeof(lp.GrantCopyC)
    assert num(abi, "grant_copy.segments") == lp.GrantCopyC.segments.offset
    seg = lp.GrantCopySegmentC
    assert num(abi, "grant_copy_segment.size") == ctypes.sizeof(seg)
    for field in ("source", "dest", "len", "flags", "status"):
        assert num(abi, f"grant_copy_segment.{field}") == getattr(seg, field).offset, field
    assert num(abi, "grant_copy_segment.source.foreign.offset") == lp._Foreign.offset.offset
    assert num(abi, "grant_copy_segment.source.foreign.domid") == lp._Foreign.domid.offset
    assert num(abi, "GNTCOPY_source_gref") == lp.GNTCOPY_SOURCE_GREF
    assert num(abi, "GNTCOPY_dest_gref") == lp.GNTCOPY_DEST_GREF
    assert num(abi, "GNTST_okay") == lp.GNTST_OKAY
