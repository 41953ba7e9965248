"""vscsiif request <-> the core's request types: checks and conversions, no I/O.

Hostile-input rules (each answered with XEN_VSCSIIF_RSLT_HOST_ERROR, as
xen-scsiback answers DID_ERROR): cmd_len 0 or > VSCSIIF_MAX_COMMAND_SIZE,
a direction other than TO_DEVICE/FROM_DEVICE/NONE, data segments with NONE,
more than VSCSIIF_SG_TABLESIZE seg[] entries, SG_GRANT when not offered or
beyond feature-sg-grant, indirect arrays not a multiple of the segment size,
any offset + length beyond the page.
"""

from __future__ import annotations

from collections.abc import Sequence

from bridge.scsi.request import ScsiResponse, ServiceResponse, TmfServiceResponse
from bridge.xen import vscsiif
from bridge.xen.vscsiif import RsltHost, Segment, VscsiifRequest, VscsiifResponse


class RequestError(Exception):
    def __init__(self, host: RsltHost, reason: str) -> None:
        super().__init__(reason)
        self.host = host


def _check_in_page(segs: Sequence[Segment], what: str) -> None:
    for s in segs:
        if s.offset + s.length > vscsiif.VSCSIIF_PAGE_SIZE:
            raise RequestError(RsltHost.ERROR,
                               f"{what} offset {s.offset} + length {s.length} beyond the page")


def check_cdb_request(req: VscsiifRequest, sg_grant_max: int) -> None:
    if not 1 <= req.cmd_len <= vscsiif.VSCSIIF_MAX_COMMAND_SIZE:
        raise RequestError(RsltHost.ERROR, f"cmd_len {req.cmd_len}")
    if req.sc_data_direction not in (vscsiif.DMA_TO_DEVICE, vscsiif.DMA_FROM_DEVICE,
                                     vscsiif.DMA_NONE):
        raise RequestError(RsltHost.ERROR, f"sc_data_direction {req.sc_data_direction}")
    if req.seg_count > vscsiif.VSCSIIF_SG_TABLESIZE:
        raise RequestError(RsltHost.ERROR, f"nr_segments {req.nr_segments:#x}")
    if req.sg_grant and not sg_grant_max:
        raise RequestError(RsltHost.ERROR, "VSCSIIF_SG_GRANT without feature-sg-grant")
    # Segments with DMA_NONE are ignored, never mapped, as xen-scsiback maps nothing for a
    # command without data: xen-scsifront sends them when its error handler reuses a
    # command's request for TEST UNIT READY (the shadow keeps the failed READ's segments).
    entries = req.seg[: req.seg_count]
    _check_in_page(entries, "seg[]")
    if req.sg_grant:
        total = 0
        for s in entries:
            if s.length % vscsiif.SEGMENT.size:
                raise RequestError(RsltHost.ERROR, f"indirect length {s.length} not a multiple of 8")
            total += s.length // vscsiif.SEGMENT.size
        if total > sg_grant_max:
            raise RequestError(RsltHost.ERROR,
                               f"{total} indirect segments beyond feature-sg-grant {sg_grant_max}")


def indirect_segments(pages: Sequence[bytes]) -> list[Segment]:
    """The data segments listed in the (already read) indirect pages; bounds-checked."""
    segs: list[Segment] = []
    for raw in pages:
        segs.extend(vscsiif.decode_segments(raw, 0, len(raw)))
    _check_in_page(segs, "indirect segment")
    return segs


# The core's service responses -> XEN_VSCSIIF_RSLT_HOST (the DID_* codes xen-scsiback
# gives for the same outcomes).
HOST_FOR_RESPONSE = {
    ServiceResponse.COMMAND_COMPLETE: RsltHost.OK,
    ServiceResponse.DATA_OVERRUN: RsltHost.ERROR,
    ServiceResponse.TASK_ABORTED: RsltHost.ABORT,
    ServiceResponse.TASK_ABORTED_BY_RESET: RsltHost.RESET,  # DID_RESET: the midlayer retries
    ServiceResponse.SERVICE_DELIVERY_FAILURE: RsltHost.ERROR,
    ServiceResponse.TARGET_FAILURE: RsltHost.TARGET_FAILURE,
    ServiceResponse.PORT_DOWN: RsltHost.NO_CONNECT,  # a failed link (port.down)
}


def response_for(rqid: int, resp: ScsiResponse, data_len: int) -> VscsiifResponse:
    host = HOST_FOR_RESPONSE[resp.response]
    sense = bytes(resp.sense[: vscsiif.VSCSIIF_SENSE_BUFFERSIZE])
    # Nothing was transferred when the transport failed the command.
    residual = min(max(resp.residual, 0), data_len) if host == RsltHost.OK else data_len
    return VscsiifResponse(rqid, vscsiif.rslt(host, resp.status), sense, residual)


def error_response(rqid: int, host: RsltHost) -> VscsiifResponse:
    return VscsiifResponse(rqid, vscsiif.rslt(host, 0))


def tmf_succeeded(response: TmfServiceResponse) -> bool:
    """FUNCTION COMPLETE and FUNCTION SUCCEEDED both mean done (RESET_SUCCESS)."""
    return response in (TmfServiceResponse.FUNCTION_COMPLETE,
                        TmfServiceResponse.FUNCTION_SUCCEEDED)


def max_transfer_bytes(sg_grant: int) -> int:
    """The most data xen-scsifront puts in one request, as it tells its SCSI midlayer
    (scsifront_read_backend_params: nr_segs = max(min(feature-sg-grant, SG_ALL = 128),
    VSCSIIF_SG_TABLESIZE), max_sectors = (nr_segs - 1) pages): 508 KiB with grants."""
    segs = max(min(sg_grant, 128), vscsiif.VSCSIIF_SG_TABLESIZE)
    return (segs - 1) * vscsiif.VSCSIIF_PAGE_SIZE
