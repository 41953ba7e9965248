"""Random hostile streams on the hostile socket while the good guest does I/O.

Each example is one connection: VERSION or not, then messages built from
plausible headers with hostile sizes, types and payloads, any kind of fd
attached, cut into random chunks. The ``attack`` fixture checks, around the
whole run, that the good guest never stalled and the bridge came back to its
baseline; each example checks the bridge is alive. Bounded here (40
examples); VSCSI_FUZZ_EXAMPLES sets more (tests/unit/vfio_user/test_session_fuzz.py).
"""

from __future__ import annotations

import array
import os
import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.vfio_user import protocol as p
from tests.hostile.client import connect_unix, make_fd, version_payload
from tests.hostile.conftest import Bridge

EXAMPLES = int(os.environ.get("VSCSI_FUZZ_EXAMPLES", "40"))
FD_KINDS = ("sealed", "unsealed", "pipe", "eventfd")


@st.composite
def message(draw) -> bytes:
    command = draw(st.sampled_from(list(range(0, 20)) + [0xFFFF]))
    flags = draw(st.sampled_from([0, 0, p.FLAG_NO_REPLY, p.TYPE_REPLY, 0x2F]))
    fields = [draw(st.sampled_from([0, 1, 2, 7, 16, 20, 32, 0x1000, 2**32 - 1]))
              for _ in range(5)]
    payload = p.IRQ_SET.pack(*fields) + draw(st.binary(max_size=24))
    payload = payload[: draw(st.integers(0, len(payload)))]
    msg = p.encode_message(draw(st.integers(0, 0xFFFF)), command, payload, flags)
    if draw(st.integers(0, 9)) == 0:  # a lying size field
        size = draw(st.sampled_from([0, 15, 17, 2**20 + 2**16 + 1, 2**32 - 1]))
        msg = msg[:4] + size.to_bytes(4, "little") + msg[8:]
    return msg


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(negotiate=st.booleans(), msgs=st.lists(message(), min_size=1, max_size=8),
       cuts=st.lists(st.integers(1, 64), max_size=8),
       fds=st.lists(st.lists(st.sampled_from(FD_KINDS), max_size=4), max_size=4))
def test_random_streams_on_the_hostile_socket(attack: Bridge, negotiate: bool,
                                              msgs: list[bytes], cuts: list[int],
                                              fds: list[list[str]]) -> None:
    stream = (p.encode_message(0, p.Command.VERSION, version_payload()) if negotiate
              else b"") + b"".join(msgs)
    sock = connect_unix(attack.hostile_sock, 5.0)
    pos = 0
    try:
        for i, cut in enumerate(cuts + [len(stream)]):
            chunk = stream[pos : pos + cut]
            if not chunk:
                break
            opened = [make_fd(k) for k in (fds[i] if i < len(fds) else [])]
            anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", opened))]
                   if opened else [])
            try:
                sock.sendmsg([chunk], anc)
            except (BrokenPipeError, ConnectionResetError):
                break  # closed by the bridge: allowed
            finally:
                for fd in opened:
                    os.close(fd)
            pos += len(chunk)
    finally:
        sock.close()
    assert attack.alive(), attack.log()[-3000:]
