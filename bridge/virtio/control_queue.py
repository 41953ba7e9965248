"""The virtio-scsi control queue (virtio 1.2 5.6.6.2): task management functions and
asynchronous-notification queries, served with the request queues' ring policy."""

from __future__ import annotations

import logging
from typing import Any

import trio

from bridge.scsi.buffers import gather, scatter, total_len
from bridge.scsi.request import TmfRequest
from bridge.virtio.request_queue import RequestQueue
from bridge.virtio.scsi_wire import (
    AN_REQ_SIZE,
    AN_RESP_SIZE,
    TMF_REQ_SIZE,
    TMF_RESPONSE_CODE,
    TMF_SUBTYPES,
    VIRTIO_SCSI_T_AN_QUERY,
    VIRTIO_SCSI_T_AN_SUBSCRIBE,
    VIRTIO_SCSI_T_TMF,
    VirtioScsiResponse,
    ctrl_type,
    decode_lun,
    encode_an_resp,
    parse_an_req,
    parse_tmf_req,
)
from bridge.virtio.virtqueue import DescriptorChain

log = logging.getLogger(__name__)


class ControlQueue(RequestQueue):
    """Queue 0. Every request is served in a task: a TMF waits for the tasks it acts on."""

    def _start(self, chain: DescriptorChain) -> Any:
        return chain

    async def _serve(self, chain: DescriptorChain, pending: Any) -> None:
        try:
            written = await self._control(chain)
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception:
            log.exception("control queue: request failed")
            written = self._reject(chain, "internal error")
        self._complete(chain, written)

    async def _control(self, chain: DescriptorChain) -> int:
        if chain.error is not None:
            return self._reject(chain, chain.error)
        raw = gather(chain.readable, TMF_REQ_SIZE)
        typ = ctrl_type(raw)
        out = chain.writable
        if typ == VIRTIO_SCSI_T_TMF and len(raw) >= TMF_REQ_SIZE and total_len(out) >= 1:
            tmf = parse_tmf_req(raw)
            lun = decode_lun(tmf.lun)
            function = TMF_SUBTYPES.get(tmf.subtype)
            if lun is None:
                response = VirtioScsiResponse.BAD_TARGET
            elif function is None:
                response = VirtioScsiResponse.FUNCTION_REJECTED
            else:
                result = await self._target.task_management(
                    TmfRequest(function, lun, tmf.tag, self._initiator)
                )
                response = TMF_RESPONSE_CODE[result.response]
            return scatter(out, bytes((int(response),)))
        if (
            typ in (VIRTIO_SCSI_T_AN_QUERY, VIRTIO_SCSI_T_AN_SUBSCRIBE)
            and len(raw) >= AN_REQ_SIZE
            and total_len(out) >= AN_RESP_SIZE
        ):
            an = parse_an_req(raw)
            # virtio 1.2 5.6.6.2: we support no asynchronous notifications: event_actual 0
            response = (
                VirtioScsiResponse.OK if decode_lun(an.lun) is not None
                else VirtioScsiResponse.BAD_TARGET
            )
            return scatter(out, encode_an_resp(0, response))
        return self._reject(chain, f"unknown or short control request (type {typ})")

    def _reject(self, chain: DescriptorChain, reason: str) -> int:
        self._device._warn_guest("malformed control request (head %d): %s", chain.head, reason)
        if chain.response_usable and total_len(chain.writable) >= 1:
            return scatter(chain.writable, bytes((VirtioScsiResponse.FAILURE,)))
        self._pci.set_needs_reset(f"control request without a response buffer: {reason}")
        return 0
