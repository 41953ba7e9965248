"""Scatter-gather helpers over the request's memoryviews (no I/O, no copies of bulk data)."""

from __future__ import annotations

from collections.abc import Sequence


def as_bytes_view(view: memoryview) -> memoryview:
    """A flat unsigned-byte view of ``view`` (guest buffers may arrive in any format)."""
    if view.format == "B" and view.ndim == 1:
        return view
    return view.cast("B")


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
    """The first ``nbytes`` bytes of the views as one bytes object (small parameter lists only)."""
    return b"".join(bytes(v) for v in prefix(views, nbytes))


def zero(views: Sequence[memoryview]) -> None:
    for v in views:
        v[:] = bytes(len(v))
