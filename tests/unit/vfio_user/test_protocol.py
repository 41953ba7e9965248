"""Codec round trips and the stream decoder (bridge/vfio_user/protocol.py)."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from bridge.vfio_user import protocol as p


def test_header_round_trip() -> None:
    raw = p.encode_message(0xBEEF, p.Command.REGION_WRITE, b"abc", p.FLAG_NO_REPLY)
    hdr = p.parse_header(raw)
    assert (hdr.msg_id, hdr.command, hdr.size, hdr.flags, hdr.error) == (
        0xBEEF, 10, 19, p.FLAG_NO_REPLY, 0)
    assert hdr.no_reply and not hdr.is_reply


def test_error_reply_is_header_only() -> None:
    req = p.Header(7, p.Command.DMA_MAP, 48)
    raw = p.encode_error(req, errno.EEXIST)
    assert len(raw) == 16
    hdr = p.parse_header(raw)
    assert hdr.is_reply and hdr.flags & p.FLAG_ERROR and hdr.error == errno.EEXIST
    assert (hdr.msg_id, hdr.command) == (7, p.Command.DMA_MAP)


def test_version_round_trip_and_nul_required() -> None:
    payload = p.encode_version(0, 0, {"max_msg_fds": 16, "write_multiple": True})
    assert payload.endswith(b"\0")
    v = p.parse_version(payload)
    assert (v.major, v.minor) == (0, 0)
    assert v.capabilities == {"max_msg_fds": 16, "write_multiple": True}
    with pytest.raises(p.ProtocolError) as exc:
        p.parse_version(payload[:-1])
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(p.ProtocolError):
        p.parse_version(b"\0\0\0\0[1,2]\0")
    with pytest.raises(p.ProtocolError):
        p.parse_version(b"\0\0")  # short


def test_dma_map_validation() -> None:
    good = p.DMA_MAP.pack(32, 3, 0x1000, 0x100000, 0x2000)
    m = p.parse_dma_map(good)
    assert (m.flags, m.offset, m.address, m.size) == (3, 0x1000, 0x100000, 0x2000)
    for bad in (good[:31], p.DMA_MAP.pack(8, 3, 0, 0, 0x1000), p.DMA_MAP.pack(32, 4, 0, 0, 1),
                p.DMA_MAP.pack(32, 3, 0, 0, 0), p.DMA_MAP.pack(32, 3, 0, 2**64 - 1, 2)):
        with pytest.raises(p.ProtocolError) as exc:
            p.parse_dma_map(bad)
        assert exc.value.errno == errno.EINVAL


def test_dma_unmap_flags() -> None:
    u = p.parse_dma_unmap(p.DMA_UNMAP.pack(24, p.DMA_UNMAP_FLAG_ALL, 0, 0))
    assert u.flags == p.DMA_UNMAP_FLAG_ALL
    assert p.encode_dma_unmap(u) == p.DMA_UNMAP.pack(24, 2, 0, 0)
    with pytest.raises(p.ProtocolError) as exc:
        p.parse_dma_unmap(p.DMA_UNMAP.pack(24, 1, 0, 4096))
    assert exc.value.errno == errno.ENOTSUP
    with pytest.raises(p.ProtocolError):
        p.parse_dma_unmap(p.DMA_UNMAP.pack(24, 2, 4096, 4096))


def test_region_info_sparse_cap_only_when_it_fits() -> None:
    small = p.encode_region_info(32, 2, 7, 0x4000, 0, [(0x1000, 0x1000)])
    argsz, flags, index, cap_offset, size, offset = p.REGION_INFO.unpack_from(small)
    assert len(small) == 32
    assert argsz == 32 + 8 + 8 + 16  # what the client must ask for
    assert flags & p.REGION_INFO_FLAG_CAPS and cap_offset == 32
    full = p.encode_region_info(argsz, 2, 7, 0x4000, 0, [(0x1000, 0x1000)])
    assert len(full) == argsz
    cap_id, version, nxt = p.CAP_HEADER.unpack_from(full, 32)
    assert (cap_id, version, nxt) == (1, 1, 0)
    assert p.SPARSE_MMAP.unpack_from(full, 40) == (1, 0)
    assert p.SPARSE_AREA.unpack_from(full, 48) == (0x1000, 0x1000)
    plain = p.encode_region_info(32, 7, 3, 256, 0, [])
    assert p.REGION_INFO.unpack_from(plain)[3] == 0 and len(plain) == 32


def test_irq_set_validation() -> None:
    s = p.parse_irq_set(p.IRQ_SET.pack(20, p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER,
                                       2, 1, 1))
    assert (s.index, s.start, s.count) == (2, 1, 1)
    assert s.data_type == p.IRQ_SET_DATA_EVENTFD and s.action == p.IRQ_SET_ACTION_TRIGGER
    for flags in (p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_TRIGGER,
                  p.IRQ_SET_DATA_NONE, 0x100 | p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_MASK):
        with pytest.raises(p.ProtocolError):
            p.parse_irq_set(p.IRQ_SET.pack(20, flags, 0, 0, 1))
    with pytest.raises(p.ProtocolError):  # DATA_BOOL needs count bytes
        p.parse_irq_set(p.IRQ_SET.pack(20, p.IRQ_SET_DATA_BOOL | p.IRQ_SET_ACTION_MASK, 0, 0, 2)
                        + b"\1")


def test_region_access_and_write_multi_round_trip() -> None:
    acc = p.parse_region_access(p.encode_region_access(0x10, 4, 2, b"hi"), True, "W")
    assert (acc.offset, acc.region, acc.count, acc.data) == (0x10, 4, 2, b"hi")
    with pytest.raises(p.ProtocolError):
        p.parse_region_access(p.encode_region_access(0x10, 4, 3, b"hi"), True, "W")
    raw = p.encode_write_multi([(0, 1, b"\1\2\3\4"), (8, 2, b"x")])
    assert len(raw) == 8 + 2 * 24
    writes = p.parse_write_multi(raw)
    assert [(w.offset, w.region, w.data) for w in writes] == [(0, 1, b"\1\2\3\4"), (8, 2, b"x")]
    with pytest.raises(p.ProtocolError):
        p.parse_write_multi(raw[:-1])
    with pytest.raises(p.ProtocolError):
        p.parse_write_multi(p.WRITE_MULTI_COUNT.pack(201) + bytes(201 * 24))


def test_dma_rw_layout_as_qemu_11_1_uses_it() -> None:
    # {u64 address, u64 count, data}: data at byte 32, as seen from QEMU 11.1.3
    # (tests/integration/test_vfio_user_qemu.py) and as vfio-user.rst specifies.
    req = p.encode_message(1, p.Command.DMA_READ, p.encode_dma_read_request(0x1000, 64))
    assert len(req) == 32 and struct.unpack_from("=QQ", req, 16) == (0x1000, 64)
    wr = p.encode_message(2, p.Command.DMA_WRITE, p.encode_dma_write_request(0x2000, b"data"))
    assert len(wr) == 32 + 4 and wr[32:36] == b"data"
    reply_payload = struct.pack("=QQ", 0x1000, 4) + b"abcd"
    assert p.parse_dma_read_reply(reply_payload, 4) == b"abcd"
    with pytest.raises(p.ProtocolError):
        p.parse_dma_read_reply(reply_payload[:-1], 4)


def _msg(cmd: int, payload: bytes = b"", msg_id: int = 1) -> bytes:
    return p.encode_message(msg_id, cmd, payload)


def test_decoder_byte_by_byte() -> None:
    stream = _msg(p.Command.DEVICE_RESET, msg_id=1) + _msg(p.Command.REGION_READ,
                                                           bytes(16), msg_id=2)
    d = p.MessageDecoder(4096)
    got = []
    for i in range(len(stream)):
        d.feed(stream[i : i + 1])
        while (ev := d.next_event()) is not None:
            got.append(ev)
    assert [type(e) for e in got] == [p.Message, p.Message]
    assert [e.header.msg_id for e in got] == [1, 2]
    assert got[1].payload == bytes(16)


def test_decoder_fds_belong_to_the_message_holding_the_chunk_end() -> None:
    r1, w1 = os.pipe()
    a = _msg(p.Command.DEVICE_RESET, msg_id=1)
    b = _msg(p.Command.DMA_MAP, bytes(32), msg_id=2)
    d = p.MessageDecoder(4096)
    # One recvmsg: tail of nothing + a + b, fds attached to b (the chunk end).
    d.feed(a + b[:10], [])
    d.feed(b[10:], [r1])
    first = d.next_event()
    second = d.next_event()
    assert isinstance(first, p.Message) and first.fds == []
    assert isinstance(second, p.Message) and second.fds == [r1]
    os.close(r1)
    os.close(w1)


def test_decoder_oversized_is_skipped_and_stream_resyncs() -> None:
    d = p.MessageDecoder(64)
    big = p.encode_message(5, p.Command.REGION_WRITE, bytes(200))
    nxt = _msg(p.Command.DEVICE_RESET, msg_id=6)
    d.feed(big[:40])
    ev = d.next_event()
    assert isinstance(ev, p.OversizedMessage) and ev.header.msg_id == 5
    d.feed(big[40:150])
    assert d.next_event() is None
    d.feed(big[150:] + nxt)
    ev = d.next_event()
    assert isinstance(ev, p.Message) and ev.header.msg_id == 6


def test_decoder_closes_fds_of_skipped_bytes() -> None:
    r, w = os.pipe()
    d = p.MessageDecoder(64)
    big = p.encode_message(5, p.Command.REGION_WRITE, bytes(200))
    d.feed(big, [r])
    assert isinstance(d.next_event(), p.OversizedMessage)
    with pytest.raises(OSError):
        os.fstat(r)  # closed by the decoder
    os.close(w)


def test_decoder_size_below_header_is_fatal() -> None:
    d = p.MessageDecoder(4096)
    d.feed(p.HEADER.pack(1, 1, 8, 0, 0))
    ev = d.next_event()
    assert isinstance(ev, p.FramingError)
    d.feed(_msg(p.Command.DEVICE_RESET))
    assert d.next_event() is None


@pytest.mark.parametrize("recv_size", [7, 16, 40, 65536])
def test_decoder_pairs_fds_correctly_with_the_real_kernel(recv_size: int) -> None:
    """Back-to-back sendmsg()s, some with fds, read with recvmsg() of any size:
    each message must get exactly the fds it was sent with."""
    import array
    import socket

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pipes = [os.pipe() for _ in range(3)]
    plan = [(1, []), (2, [pipes[0][0]]), (3, [pipes[1][0], pipes[2][0]]), (4, []),
            (5, [pipes[0][1]])]
    for msg_id, fds in plan:
        raw = p.encode_message(msg_id, p.Command.DMA_MAP, bytes(32))
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        a.sendmsg([raw], anc)
    a.close()
    d = p.MessageDecoder(4096)
    got: dict[int, list[int]] = {}
    while True:
        data, anc, flags, _ = b.recvmsg(recv_size, socket.CMSG_SPACE(16 * 4))
        fds = []
        for _level, _kind, raw in anc:
            arr = array.array("i")
            arr.frombytes(raw)
            fds.extend(arr)
        if not data:
            break
        d.feed(data, fds)
        while (ev := d.next_event()) is not None:
            assert isinstance(ev, p.Message)
            got[ev.header.msg_id] = ev.fds
    b.close()
    assert sorted(got) == [1, 2, 3, 4, 5]
    for msg_id, sent in plan:
        received = got[msg_id]
        assert len(received) == len(sent), (msg_id, received)
        for s_fd, r_fd in zip(sent, received, strict=True):
            assert os.fstat(s_fd).st_ino == os.fstat(r_fd).st_ino
            os.close(r_fd)
    for r, w in pipes:
        os.close(r)
        os.close(w)
