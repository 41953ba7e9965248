"""Hostile input to the sans-I/O layers: never an exception, always an answer."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.vfio_user import protocol as p
from bridge.vfio_user.dma import DmaSpaceImpl
from bridge.vfio_user.session import Session

from .test_server import DummyDevice

_VERSION = p.encode_message(0, p.Command.VERSION, b"\0\0\0\0{}\0")


@st.composite
def messages(draw) -> bytes:
    command = draw(st.integers(0, 20))
    flags = draw(st.sampled_from([0, 0, 0, p.FLAG_NO_REPLY, 1, 2]))
    if draw(st.booleans()):
        # structured: plausible fixed fields with hostile values
        payload = struct.pack("=IIIIQQ", *(draw(st.integers(0, 2**32 - 1)) for _ in range(4)),
                              draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 2**64 - 1)))
        payload = payload[: draw(st.integers(0, len(payload)))]
    else:
        payload = draw(st.binary(max_size=64))
    return p.encode_message(draw(st.integers(0, 0xFFFF)), command, payload, flags)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages(), max_size=12), st.booleans())
def test_random_messages_never_raise_and_each_command_is_answered(msgs, negotiate) -> None:
    dev = DummyDevice()
    session = Session(dev, DmaSpaceImpl())
    decoder = p.MessageDecoder(4096)
    stream = (_VERSION if negotiate else b"") + b"".join(msgs)
    decoder.feed(stream)
    commands = 0
    replies = 0
    while (ev := decoder.next_event()) is not None:
        assert isinstance(ev, p.Message)
        out = session.handle(ev)
        if not ev.header.no_reply:
            commands += 1
        if out is not None:
            replies += 1
            hdr = p.parse_header(out.data)
            assert hdr.msg_id == ev.header.msg_id and hdr.command == ev.header.command
            assert hdr.size == len(out.data) and hdr.is_reply
    assert replies == commands
    session.dma.unmap_all()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 50))
def test_decoder_survives_arbitrary_bytes_in_arbitrary_chunks(data: bytes, chunk: int) -> None:
    d = p.MessageDecoder(128)
    for i in range(0, len(data), chunk):
        d.feed(data[i : i + chunk])
        while (ev := d.next_event()) is not None:
            if isinstance(ev, p.FramingError):
                return
