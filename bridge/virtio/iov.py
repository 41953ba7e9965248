"""Scatter-gather lists of guest-memory views (virtio 1.2 2.6.4: no framing assumptions).

A descriptor chain is one byte stream split over buffers; these helpers cut,
gather and scatter such a stream without copying the data part.
"""

from __future__ import annotations

from collections.abc import Sequence


def iov_len(views: Sequence[memoryview]) -> int:
    return sum(map(len, views))


def iov_split(views: Sequence[memoryview], n: int) -> tuple[list[memoryview], list[memoryview]]:
    """(the first ``n`` bytes, the rest) as lists of views; the head is shorter when the stream is."""
    if views and len(views[0]) == n:  # the usual framing: the header has its own buffer
        return [views[0]], list(views[1:])
    head: list[memoryview] = []
    tail: list[memoryview] = []
    need = n
    for v in views:
        if need <= 0:
            tail.append(v)
        elif len(v) <= need:
            head.append(v)
            need -= len(v)
        else:
            head.append(v[:need])
            tail.append(v[need:])
            need = 0
    return head, tail


def iov_to_bytes(views: Sequence[memoryview], n: int) -> bytes:
    """Copy out at most the first ``n`` bytes (used for small headers only)."""
    if views and len(views[0]) >= n:
        return bytes(views[0][:n])
    out = bytearray()
    for v in views:
        if len(out) >= n:
            break
        out += v[: n - len(out)]
    return bytes(out)


def iov_from_bytes(views: Sequence[memoryview], data: bytes) -> int:
    """Scatter ``data`` over the views; returns how many bytes fitted."""
    done = 0
    for v in views:
        if done >= len(data):
            break
        k = min(len(v), len(data) - done)
        v[:k] = data[done : done + k]
        done += k
    return done
