"""Hostile input to the sans-I/O layers: never an exception, always an answer.

Bounded for the test suite; for a longer run set VSCSI_FUZZ_EXAMPLES (the
number of examples of each test here and of tests/hostile/test_fuzz.py), e.g.
``VSCSI_FUZZ_EXAMPLES=20000 tests/run -k fuzz``.
"""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.vfio_user import protocol as p
from bridge.vfio_user.budget import ConnectionBudget
from bridge.vfio_user.dma import DmaSpaceImpl
from bridge.vfio_user.session import Session
from tests.hostile.client import make_fd

from .test_server import DummyDevice

EXAMPLES = int(os.environ.get("VSCSI_FUZZ_EXAMPLES", "300"))
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


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 50))
def test_decoder_survives_arbitrary_bytes_in_arbitrary_chunks(data: bytes, chunk: int) -> None:
    d = p.MessageDecoder(128)
    for i in range(0, len(data), chunk):
        d.feed(data[i : i + chunk])
        while (ev := d.next_event()) is not None:
            if isinstance(ev, p.FramingError):
                return


# --- with file descriptors, against a small budget ----------------------------------------

FD_KINDS = ("sealed", "unsealed", "pipe", "eventfd", "file")


@st.composite
def fd_messages(draw) -> tuple[bytes, list[str]]:
    """DMA_MAP / DMA_UNMAP / SET_IRQS with hostile fields and any kind of fd."""
    command = draw(st.sampled_from([p.Command.DMA_MAP, p.Command.DMA_MAP, p.Command.DMA_UNMAP,
                                    p.Command.DEVICE_SET_IRQS]))
    small = st.integers(0, 8).map(lambda n: n * 0x1000)
    if command == p.Command.DMA_MAP:
        payload = p.DMA_MAP.pack(32, draw(st.integers(0, 4)), draw(small), draw(small),
                                 draw(st.sampled_from([0x1000, 0x2000, 0x4000, 0x5000,
                                                       2**64 - 1])))
    elif command == p.Command.DMA_UNMAP:
        payload = p.DMA_UNMAP.pack(24, draw(st.sampled_from([0, 0, 2])), draw(small),
                                   draw(small))
    else:
        payload = p.IRQ_SET.pack(20, draw(st.sampled_from([0x24, 0x24, 0x21, 0x0C])),
                                 draw(st.integers(0, 5)), draw(st.integers(0, 4)),
                                 draw(st.integers(0, 5)))
    kinds = draw(st.lists(st.sampled_from(FD_KINDS), max_size=3))
    return p.encode_message(draw(st.integers(0, 0xFFFF)), command, payload), kinds


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(fd_messages(), max_size=16))
def test_fd_messages_keep_the_budget_and_leak_nothing(msgs) -> None:
    dev = DummyDevice()
    budget = ConnectionBudget(pinned_fds=7, fds_in_flight=16, dma_maps=6,
                              mapped_bytes=0x8000)
    dma = DmaSpaceImpl()
    session = Session(dev, dma, budget=budget)
    before = _open_fds()
    decoder = p.MessageDecoder(4096)
    decoder.feed(_VERSION)
    session.handle(decoder.next_event())
    for data, kinds in msgs:
        decoder.feed(data, [make_fd(k) for k in kinds])
        ev = decoder.next_event()
        assert isinstance(ev, p.Message)
        out = session.handle(ev)
        assert out is not None and p.parse_header(out.data).msg_id == ev.header.msg_id
        # the DummyDevice keeps up to 1 + 4 eventfds (IRQ indexes 0 and 2) of the 7
        assert dma.fd_maps <= dma.max_fd_maps == 7 - 5
        assert dma.mapped_bytes <= 0x8000 and len(dma) <= 6
        # every vector the device holds is a non-blocking eventfd
        for fd in dev.vectors:
            if fd is not None:
                assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
                assert not os.get_blocking(fd)
    dma.unmap_all()
    dev.detach()
    assert (dma.fd_maps, dma.mapped_bytes) == (0, 0)
    # Every fd the messages brought is closed: none is open now that was not before (an
    # object of an earlier test freed meanwhile may close one of those: not ours).
    assert not _open_fds() - before
