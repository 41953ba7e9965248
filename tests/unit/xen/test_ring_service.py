"""RingService helpers that the booted paths reach only rarely."""

import logging

from bridge.xen.ring_service import _release


class _Pages:
    """Stands for a mapping whose close fails while ``busy`` views remain."""

    def __init__(self, busy: int) -> None:
        self.busy = busy
        self.calls = 0

    def close(self) -> None:
        self.calls += 1
        if self.busy:
            self.busy -= 1
            raise BufferError("exported pointers exist")


def test_release_retries_once_after_a_collection():
    pages = _Pages(busy=1)
    _release(pages.close, "dom5 ring")
    assert pages.calls == 2 and pages.busy == 0


def test_release_still_referenced_is_logged_not_raised(caplog):
    pages = _Pages(busy=5)
    with caplog.at_level(logging.ERROR):
        _release(pages.close, "dom5 ring")
    assert pages.calls == 2
    assert any("dom5 ring still referenced" in r.getMessage() for r in caplog.records)
