"""Guest-caused log lines are rate-limited (issue 15 item 6): 20 in full, then every 1000th."""

import logging

import trio

from bridge.ratelimit import guest_error_log

from .conftest import running_backend
from .frontend import raw_request


def test_first_twenty_then_every_thousandth(caplog):
    glog = guest_error_log(logging.getLogger("test.guest_log"))
    with caplog.at_level(logging.WARNING, "test.guest_log"):
        for i in range(2500):
            glog.warning("bad request %d", i)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 22 and glog.calls == 2500
    assert lines[0] == "bad request 0"
    assert lines[19] == "bad request 19"
    assert lines[20:] == ["bad request 999 [979 similar lines suppressed]",
                          "bad request 1999 [999 similar lines suppressed]"]


async def test_a_flood_of_refused_requests_is_logged_twenty_times(env, caplog):
    async with running_backend(env) as (backend, fe, _):
        with caplog.at_level(logging.WARNING, "bridge.xen"):
            for _ in range(30):
                rq = fe.next_rqid_hint()
                with trio.fail_after(5):
                    r = await fe.send_raw(raw_request(rq, act=9))  # unknown act
                assert r.rslt != 0
                fe._free_rqids.insert(0, rq)
        refused = [r for r in caplog.records if "unknown act" in r.getMessage()]
        assert len(refused) == 20 and backend.guest_log.calls == 30
        assert backend.stats["errors"] == 30  # every one still answered and counted
