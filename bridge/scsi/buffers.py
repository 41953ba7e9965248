"""Scatter-gather helpers over the request's memoryviews (no I/O, no copies of bulk data).

A request's buffers are one byte stream split over views of guest memory
(virtio 1.2 2.6.4: no framing assumptions); these cut, gather and scatter such
a stream. Shared by the core and the transports (which may import the core).
"""

from __future__ import annotations

from collections.abc import Sequence


def as_bytes_view(view: memoryview) -> memoryview:
    """A flat unsigned-byte view of ``view`` (guest buffers may arrive in any format)."""
    if view.format == "B" and view.ndim == 1:
        return view
    return view.cast("B")


def total_len(views: Sequence[memoryview]) -> int:
    return sum(map(len, views))


def split(views: Sequence[memoryview], nbytes: int) -> tuple[list[memoryview], list[memoryview]]:
    """(the first ``nbytes`` bytes, the rest); the first part is shorter when the stream is."""
    if views and len(views[0]) == nbytes:  # the usual framing: a header in its own buffer
        return [views[0]], list(views[1:])
    head: list[memoryview] = []
    tail: list[memoryview] = []
    need = nbytes
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


def prefix(views: Sequence[memoryview], nbytes: int) -> list[memoryview]:
    """The views covering exactly the first ``nbytes`` bytes (fewer if the buffers are shorter)."""
    out: list[memoryview] = []
    left = nbytes
    for v in views:
        if left <= 0:
            break
        n = len(v)
        if n == 0:
            continue
        if n > left:
            out.append(v[:left])
            left = 0
            break
        out.append(v)
        left -= n
    return out


def skip(views: Sequence[memoryview], nbytes: int) -> list[memoryview]:
    """The views after dropping the first ``nbytes`` bytes."""
    out: list[memoryview] = []
    left = nbytes
    for v in views:
        if left >= len(v):
            left -= len(v)
            continue
        out.append(v[left:] if left else v)
        left = 0
    return out


def scatter(views: Sequence[memoryview], data: bytes | memoryview) -> int:
    """Copy ``data`` into the views in order; returns the bytes copied."""
    done = 0
    total = len(data)
    for v in views:
        if done >= total:
            break
        v = as_bytes_view(v)
        n = min(len(v), total - done)
        v[:n] = data[done : done + n]
        done += n
    return done


def gather(views: Sequence[memoryview], nbytes: int) -> bytes:
    """The first ``nbytes`` bytes of the views as one bytes object (headers and small
    parameter lists only); fewer when the views are shorter."""
    if views and len(views[0]) >= nbytes:  # the usual case: one buffer holds it
        return bytes(views[0][:nbytes])
    return b"".join(bytes(v) for v in prefix(views, nbytes))


def zero(views: Sequence[memoryview]) -> None:
    for v in views:
        v[:] = bytes(len(v))
