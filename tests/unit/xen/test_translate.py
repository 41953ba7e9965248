"""The core's responses -> vscsiif rslt/sense/residual."""

from bridge.scsi.request import ScsiResponse, ServiceResponse, TmfServiceResponse
from bridge.xen import translate, vscsiif
from bridge.xen.vscsiif import RsltHost


def test_ok_response_keeps_status_sense_and_residual():
    r = translate.response_for(3, ScsiResponse(ServiceResponse.COMMAND_COMPLETE, 0x02, b"\x70" + bytes(120), 100),
                               512)
    assert r.rqid == 3 and r.rslt == 0x02
    assert len(r.sense) == vscsiif.VSCSIIF_SENSE_BUFFERSIZE  # truncated to the 96-byte buffer
    assert r.residual_len == 100
    assert translate.response_for(1, ScsiResponse(residual=9999), 512).residual_len == 512


def test_transport_failures_map_to_host_bytes():
    cases = {ServiceResponse.TASK_ABORTED: RsltHost.ABORT,
             ServiceResponse.TASK_ABORTED_BY_RESET: RsltHost.RESET,
             ServiceResponse.DATA_OVERRUN: RsltHost.ERROR,
             ServiceResponse.SERVICE_DELIVERY_FAILURE: RsltHost.ERROR,
             ServiceResponse.TARGET_FAILURE: RsltHost.TARGET_FAILURE,
             ServiceResponse.PORT_DOWN: RsltHost.NO_CONNECT}
    assert set(cases) | {ServiceResponse.COMMAND_COMPLETE} == set(ServiceResponse)
    for code, host in cases.items():
        r = translate.response_for(0, ScsiResponse(code), 4096)
        assert (r.rslt >> 16) & 0xFF == host, code
        assert r.residual_len == 4096


def test_tmf_outcomes():
    assert translate.tmf_succeeded(TmfServiceResponse.FUNCTION_COMPLETE)
    assert translate.tmf_succeeded(TmfServiceResponse.FUNCTION_SUCCEEDED)
    assert not translate.tmf_succeeded(TmfServiceResponse.FUNCTION_REJECTED)
    assert not translate.tmf_succeeded(TmfServiceResponse.INCORRECT_LOGICAL_UNIT_NUMBER)


def test_max_transfer_is_what_scsifront_sends():
    """xen-scsifront: nr_segs = max(min(feature-sg-grant, 128), 26), max_sectors = nr_segs - 1
    pages: the byte limit the Block Limits page must not exceed."""
    assert translate.max_transfer_bytes(128) == 127 * 4096  # 508 KiB, as Linux sends
    assert translate.max_transfer_bytes(1024) == 127 * 4096
    assert translate.max_transfer_bytes(0) == 25 * 4096  # no SG_GRANT: 25 direct segments
