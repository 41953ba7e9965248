"""The shared ring rules (ring.h) on a plain bytearray page, both ends."""

import struct

import pytest

from bridge.xen import vscsiif
from bridge.xen.ring import VSCSIIF_RING_SIZE, BackRing, FrontRing, RingBroken, init_shared_ring


def rings(start: int = 0):
    page = memoryview(bytearray(4096))
    init_shared_ring(page)
    if start:
        struct.pack_into("<IIII", page, 0, start, start + 1, start, start + 1)
    front, back = FrontRing(page), BackRing(page)
    front.req_prod_pvt = front.rsp_cons = start
    back.req_cons = back.rsp_prod_pvt = start
    return page, front, back


def req(rqid: int) -> bytes:
    return vscsiif.encode_request(vscsiif.VscsiifRequest(
        rqid, 1, 6, bytes(16), 0, 0, 0, 0, 0, 3, 0, (vscsiif.Segment(0, 0, 0),) * 26))


@pytest.mark.parametrize("start", [0, 0xFFFFFFFE])
def test_requests_responses_and_notification_rules(start):
    page, front, back = rings(start)
    assert VSCSIIF_RING_SIZE == 16
    for i in range(3):
        front.put_request(req(i))
    assert front.push_requests_and_check_notify()  # req_event was armed at prod + 1
    got = back.take_requests()
    assert [vscsiif.decode_request(r).rqid for r in got] == [0, 1, 2]
    assert not back.final_check_for_requests()  # arms req_event = cons + 1
    front.put_request(req(3))
    assert front.push_requests_and_check_notify()
    front.put_request(req(4))
    assert not front.push_requests_and_check_notify()  # backend has not re-armed
    assert [vscsiif.decode_request(r).rqid for r in back.take_requests()] == [3, 4]
    for i in range(5):
        back.put_response(vscsiif.encode_response(vscsiif.VscsiifResponse(i, 0)))
    assert back.push_responses_and_check_notify()  # rsp_event was armed
    assert [vscsiif.decode_response(r).rqid for r in front.take_responses()] == list(range(5))
    assert not front.final_check_for_responses()
    with pytest.raises(RuntimeError):
        back.put_response(vscsiif.encode_response(vscsiif.VscsiifResponse(9, 0)))


def test_producer_more_than_a_ring_ahead_is_broken():
    page, front, back = rings()
    struct.pack_into("<I", page, 0, VSCSIIF_RING_SIZE + 1)
    with pytest.raises(RingBroken):
        back.take_requests()


def test_consumer_stops_when_no_response_slot_is_left():
    page, front, back = rings()
    for i in range(VSCSIIF_RING_SIZE):
        front.put_request(req(i))
    front.push_requests_and_check_notify()
    assert len(back.take_requests()) == VSCSIIF_RING_SIZE
    with pytest.raises(RuntimeError):
        front.put_request(req(99))  # the frontend's ring is full too
    # a hostile frontend publishing more anyway (still within one ring of rsp_prod) gets nothing
    struct.pack_into("<I", page, 0, VSCSIIF_RING_SIZE)
    assert back.take_requests() == []
    back.put_response(vscsiif.encode_response(vscsiif.VscsiifResponse(0, 0)))
    back.push_responses_and_check_notify()
    struct.pack_into("<I", page, 0, VSCSIIF_RING_SIZE + 1)
    assert len(back.take_requests()) == 1  # one slot freed, one more request taken
