"""virtio-scsi response -> vscsiif rslt/sense/residual."""

from bridge.virtio.scsi_request import ScsiResponse, VirtioScsiResponse
from bridge.xen import translate, vscsiif
from bridge.xen.vscsiif import RsltHost


def test_ok_response_keeps_status_sense_and_residual():
    r = translate.response_for(3, ScsiResponse(VirtioScsiResponse.OK, 0x02, b"\x70" + bytes(120), 100),
                               512)
    assert r.rqid == 3 and r.rslt == 0x02
    assert len(r.sense) == vscsiif.VSCSIIF_SENSE_BUFFERSIZE  # truncated to the 96-byte buffer
    assert r.residual_len == 100
    assert translate.response_for(1, ScsiResponse(residual=9999), 512).residual_len == 512


def test_transport_failures_map_to_host_bytes():
    cases = {VirtioScsiResponse.BAD_TARGET: RsltHost.BAD_TARGET,
             VirtioScsiResponse.INCORRECT_LUN: RsltHost.NO_CONNECT,
             VirtioScsiResponse.ABORTED: RsltHost.ABORT,
             VirtioScsiResponse.RESET: RsltHost.RESET,
             VirtioScsiResponse.BUSY: RsltHost.BUS_BUSY,
             VirtioScsiResponse.OVERRUN: RsltHost.ERROR,
             VirtioScsiResponse.FAILURE: RsltHost.ERROR,
             VirtioScsiResponse.TARGET_FAILURE: RsltHost.TARGET_FAILURE,
             VirtioScsiResponse.NEXUS_FAILURE: RsltHost.NEXUS_FAILURE,
             VirtioScsiResponse.TRANSPORT_FAILURE: RsltHost.TRANSPORT_DISRUPTED}
    for code, host in cases.items():
        r = translate.response_for(0, ScsiResponse(code), 4096)
        assert (r.rslt >> 16) & 0xFF == host, code
        assert r.residual_len == 4096
    assert translate.response_for(0, ScsiResponse(99), 0).rslt >> 16 == RsltHost.ERROR  # type: ignore[arg-type]


def test_tmf_outcomes():
    assert translate.tmf_succeeded(VirtioScsiResponse.OK)
    assert translate.tmf_succeeded(VirtioScsiResponse.FUNCTION_SUCCEEDED)
    assert not translate.tmf_succeeded(VirtioScsiResponse.FUNCTION_REJECTED)
    assert not translate.tmf_succeeded(VirtioScsiResponse.INCORRECT_LUN)
