"""Grant strategies: buffers seen by the target, coalescing over a contiguous mapping."""

import pytest

from bridge.xen.datapath import GrantCopy, MapPerRequest, coalesce
from bridge.xen.platform import PAGE_SIZE
from bridge.xen.vscsiif import Segment


def test_coalesce_merges_only_adjacent_ranges():
    whole = [Segment(i, 0, PAGE_SIZE) for i in range(4)]
    assert coalesce(whole) == [(0, 4 * PAGE_SIZE)]
    # a short tail page and an offset page break the run where the bytes are not adjacent
    segs = [Segment(1, 512, PAGE_SIZE - 512), Segment(2, 0, 1024), Segment(3, 0, PAGE_SIZE),
            Segment(4, 100, 200)]
    assert coalesce(segs) == [(512, PAGE_SIZE + 1024), (2 * PAGE_SIZE, 3 * PAGE_SIZE),
                              (3 * PAGE_SIZE + 100, 3 * PAGE_SIZE + 300)]


class ContiguousMapping:
    """What gntdev gives: the batch's pages back to back in one mapping."""

    def __init__(self, data: bytearray) -> None:
        self.view = memoryview(data)
        self.pages = [self.view[i:i + PAGE_SIZE] for i in range(0, len(data), PAGE_SIZE)]
        self.closed = False

    def close(self) -> None:
        for p in self.pages:
            p.release()
        self.view.release()
        self.closed = True


class FakeGrants:
    def __init__(self, pages: dict[int, bytearray]) -> None:
        self.pages = pages
        self.mapped: list[tuple[list[int], bool]] = []
        self.copies = 0

    def map(self, domid, refs, writable):
        self.mapped.append((list(refs), writable))
        return ContiguousMapping(bytearray(b"".join(self.pages[r] for r in refs)))

    def copy(self, segments):
        self.copies += 1
        for s in segments:
            page = self.pages[s.gref]
            if s.to_guest:
                page[s.offset:s.offset + len(s.local)] = s.local
            else:
                s.local[:] = page[s.offset:s.offset + len(s.local)]

    def close(self):
        pass


def guest_pages(n: int) -> dict[int, bytearray]:
    return {r: bytearray(bytes([r]) * PAGE_SIZE) for r in range(1, n + 1)}


def test_map_strategy_gives_one_view_per_contiguous_run():
    grants = FakeGrants(guest_pages(3))
    bufs = MapPerRequest(grants).acquire(1, [Segment(1, 0, PAGE_SIZE), Segment(2, 0, PAGE_SIZE),
                                             Segment(3, 0, 10)], writable=False)
    assert [len(v) for v in bufs.views] == [2 * PAGE_SIZE + 10]
    assert bytes(bufs.views[0][PAGE_SIZE - 1:PAGE_SIZE + 1]) == b"\x01\x02"
    assert grants.mapped == [([1, 2, 3], False)]
    bufs.finish()
    assert bufs.views == []


@pytest.mark.parametrize("writable", [False, True])
def test_copy_strategy_copies_in_or_out(writable):
    grants = FakeGrants(guest_pages(2))
    segs = [Segment(1, 100, 200), Segment(2, 0, 50)]
    bufs = GrantCopy(grants).acquire(1, segs, writable=writable)
    assert [len(v) for v in bufs.views] == [250]
    if writable:
        assert grants.copies == 0
        bufs.views[0][:] = b"\xaa" * 250
        bufs.finish()
        assert grants.pages[1][100:300] == b"\xaa" * 200 and grants.pages[1][99] == 1
        assert grants.pages[2][:50] == b"\xaa" * 50 and grants.pages[2][50] == 2
    else:
        assert bytes(bufs.views[0]) == b"\x01" * 200 + b"\x02" * 50
        bufs.finish()
    assert grants.copies == 1


def test_auto_copies_small_requests_and_maps_large_ones():
    from bridge.config import GRANT_STRATEGIES
    from bridge.xen.datapath import COPY_BELOW, DATA_PATHS, BySize, make_datapath

    assert set(GRANT_STRATEGIES) == set(DATA_PATHS)  # the configuration offers each one
    grants = FakeGrants(guest_pages(COPY_BELOW // PAGE_SIZE + 1))
    auto = make_datapath("auto", grants)
    assert isinstance(auto, BySize)
    small = [Segment(1, 0, PAGE_SIZE)]  # a 4 KiB READ: copied back after the command
    bufs = auto.acquire(0, small, writable=True)
    bufs.views[0][:] = b"\xaa" * PAGE_SIZE
    auto.copy_out_together([bufs])
    bufs.finish()
    assert grants.copies == 1 and grants.mapped == []
    assert grants.pages[1] == b"\xaa" * PAGE_SIZE
    large = [Segment(r, 0, PAGE_SIZE) for r in range(1, COPY_BELOW // PAGE_SIZE + 1)]
    bufs = auto.acquire(0, large, writable=False)  # a 32 KiB WRITE: mapped read-only
    assert bytes(bufs.views[0][:1]) == b"\xaa" and len(bufs.views) == 1
    bufs.finish()
    assert grants.mapped == [([r for r in range(1, COPY_BELOW // PAGE_SIZE + 1)], False)]
    assert grants.copies == 1
    with pytest.raises(ValueError, match="auto, map, copy"):
        make_datapath("mmap", grants)
