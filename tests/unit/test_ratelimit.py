"""RateLimitedLog: a burst, a refill over time, a count of what was dropped."""

from __future__ import annotations

import logging
import math

import pytest

from bridge.ratelimit import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test.ratelimit"]


def test_burst_then_refill_and_the_dropped_count_is_reported(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    rl = RateLimitedLog(logging.getLogger("test.ratelimit"), burst=3, period=3.0, clock=clock)
    logged = [rl.warning("refused %d", i) for i in range(10)]
    assert logged == [True] * 3 + [False] * 7
    assert records(caplog) == ["refused 0", "refused 1", "refused 2"]
    assert rl.calls == 10 and rl.suppressed == 7
    clock.now += 1.0  # one token back (3 per 3 s)
    assert rl.warning("refused %d", 10)
    assert not rl.warning("refused %d", 11)
    assert records(caplog)[-1] == "refused 10 [7 similar lines suppressed]"
    assert rl.suppressed == 1 and rl.suppressed_total == 8
    clock.now += 1000.0  # the bucket refills to the burst, not beyond
    assert [rl.warning("x") for _ in range(4)] == [True, True, True, False]


def test_records_name_the_callers_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    rl = RateLimitedLog(logging.getLogger("test.ratelimit"))
    rl.warning("here")
    rl.log(logging.WARNING, "and here")
    assert [r.filename for r in caplog.records] == ["test_ratelimit.py"] * 2


def test_count_based_shape_of_the_virtio_device(caplog: pytest.LogCaptureFixture) -> None:
    """First 20 in full, then every 1000th (bridge/virtio/scsi_device.py _warn_guest)."""
    caplog.set_level(logging.INFO)
    rl = RateLimitedLog(logging.getLogger("test.ratelimit"), burst=20, period=math.inf,
                        every=1000)
    logged = [n for n in range(1, 5001) if rl.warning("guest error %d", n)]
    assert logged == list(range(1, 21)) + [1000, 2000, 3000, 4000, 5000]
    assert records(caplog)[20] == "guest error 1000 [979 similar lines suppressed]"
    assert rl.calls == 5000


def test_exception_carries_the_traceback(caplog: pytest.LogCaptureFixture) -> None:
    rl = RateLimitedLog(logging.getLogger("test.ratelimit"))
    try:
        raise ValueError("boom")
    except ValueError:
        rl.exception("device failed")
    (rec,) = caplog.records
    assert rec.levelno == logging.ERROR and rec.exc_info and rec.exc_info[0] is ValueError


def test_disabled_level_costs_no_budget(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    rl = RateLimitedLog(logging.getLogger("test.ratelimit"), burst=1)
    assert not rl.info("not shown")
    assert rl.warning("shown")
    assert records(caplog) == ["shown"]


@pytest.mark.parametrize("kw", [{"burst": 0}, {"period": 0.0}, {"every": -1}])
def test_nonsense_limits_are_refused(kw: dict) -> None:
    with pytest.raises(ValueError):
        RateLimitedLog(logging.getLogger("test.ratelimit"), **kw)
