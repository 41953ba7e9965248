"""The backend's xenbus state machine as data (bridge/xen/xenbus_state.py), no platform."""

import itertools
from dataclasses import replace

import pytest

from bridge.xen.xenbus import XenbusState as S
from bridge.xen.xenbus_state import (
    CONNECT_FAILED,
    RULES,
    START_RULES,
    Action,
    Facts,
    start,
    step,
)

A = Action
UP = Facts(connected=True)
DOWN = Facts()
DETACHING = Facts(online=False)
STATES = [*S, 42]  # 42: a value a guest may write to its state node
ALL_FACTS = [Facts(*bits) for bits in itertools.product([False, True], repeat=5)]


@pytest.mark.parametrize("be, fe, facts, actions, state", [
    # handshake (scsiback_frontend_changed)
    (S.INIT_WAIT, S.INITIALISED, DOWN, (A.CONNECT, A.ADD_OR_DEL_LUNS), S.CONNECTED),
    (S.CONNECTED, S.CONNECTED, UP, (A.UPDATE_DEV_STATES,), None),
    # hot-plug: Reconfiguring both ways, then back to Connected
    (S.CONNECTED, S.CONNECTED, replace(UP, hotplug_pending=True),
     (A.UPDATE_DEV_STATES, A.START_RECONFIGURATION), None),
    (S.RECONFIGURING, S.CONNECTED, UP, (), None),
    (S.RECONFIGURING, S.RECONFIGURING, UP, (A.ADD_OR_DEL_LUNS,), S.RECONFIGURED),
    (S.RECONFIGURED, S.CONNECTED, UP, (A.UPDATE_DEV_STATES, A.REMOVE_CLOSED_DEVS), S.CONNECTED),
    # close and reconnect
    (S.CONNECTED, S.CLOSING, UP, (A.DISCONNECT,), S.CLOSING),
    (S.CLOSING, S.CLOSED, DOWN, (A.DISCONNECT,), S.CLOSED),
    (S.CLOSED, S.INITIALISING, DOWN, (A.DISCONNECT, A.REOFFER_DEVS, A.OFFER_FEATURES),
     S.INIT_WAIT),
    (S.INIT_WAIT, S.INITIALISING, DOWN, (), None),
    (S.CONNECTED, S.UNKNOWN, UP, (A.DISCONNECT,), None),
    # a connected frontend with no ring here closes, once
    (S.CONNECTED, S.CONNECTED, DOWN, (), S.CLOSING),
    (S.CLOSING, S.CONNECTED, replace(DOWN, latched_close=True), (), None),
    (S.CLOSING, S.INITIALISED, replace(DOWN, latched_close=True), (), None),
    # detach (online=0): follow the frontend down
    (S.CONNECTED, S.CONNECTED, replace(DETACHING, connected=True), (), S.CLOSING),
    (S.CLOSING, S.CLOSING, DETACHING, (A.DISCONNECT,), S.CLOSING),
    (S.CLOSING, S.CLOSED, DETACHING, (A.DISCONNECT,), S.CLOSED),
    (S.CLOSED, S.CLOSED, DETACHING, (A.DISCONNECT,), None),
    (S.CLOSED, S.INITIALISED, DETACHING, (), None),
    # a broken ring: disconnect whatever the states
    (S.CONNECTED, S.CONNECTED, replace(UP, broken=True), (A.DISCONNECT,), S.CLOSING),
    # guest garbage in its state node: nothing
    (S.CONNECTED, 42, UP, (), None),
])
def test_step_table(be, fe, facts, actions, state):
    t = step(be, fe, facts)
    assert (t.actions, t.state) == (actions, state)


def test_stop_only_when_detached_and_the_frontend_closed():
    stops = {(be, fe, f) for be in STATES for fe in STATES for f in ALL_FACTS
             if step(be, fe, f).stop}
    assert stops and all(not f.online and not f.broken for _, _, f in stops)
    assert {fe for _, fe, _ in stops} == {S.CLOSED, S.UNKNOWN}
    assert all(step(be, fe, f).state is S.CLOSED for be, fe, f in stops)


def test_no_connect_while_latched_detaching_or_connected():
    for be, fe, f in itertools.product(STATES, STATES, ALL_FACTS):
        if A.CONNECT in step(be, fe, f).actions:
            assert f.online and not f.connected and not f.latched_close, (be, fe, f)
            assert fe == S.INITIALISED


def test_broken_ring_always_disconnects_and_latches():
    for be, fe, f in itertools.product(STATES, STATES, ALL_FACTS):
        if f.broken:
            t = step(be, fe, f)
            assert t.actions == (A.DISCONNECT,) and t.latch is True and t.state is S.CLOSING


def test_every_rule_is_reachable():
    """A rule shadowed by the ones before it is dead table: each must win somewhere."""
    won = set()
    for be, fe, f in itertools.product(STATES, STATES, ALL_FACTS):
        for i, rule in enumerate(RULES):
            if rule.matches(be, fe, f):
                won.add(i)
                break
    assert won == set(range(len(RULES)))
    won = {next((i for i, r in enumerate(START_RULES) if r.matches(be, fe, DOWN)), None)
           for be, fe in itertools.product(STATES, STATES)}
    assert set(range(len(START_RULES))) <= won


@pytest.mark.parametrize("be, fe, actions, state, latch", [
    (S.INITIALISING, S.INITIALISING, (A.OFFER_FEATURES,), S.INIT_WAIT, None),  # fresh attach
    (S.INIT_WAIT, S.INITIALISING, (), None, None),
    (S.CLOSED, S.CLOSED, (A.OFFER_FEATURES,), S.INIT_WAIT, None),
    (S.CONNECTED, S.CONNECTED, (), S.CLOSING, True),  # a previous bridge's frontend
    (S.CLOSING, S.CLOSING, (), None, None),
])
def test_start_table(be, fe, actions, state, latch):
    t = start(be, fe)
    assert (t.actions, t.state, t.latch) == (actions, state, latch)


def test_failed_connect_closes_and_latches():
    assert CONNECT_FAILED.state is S.CLOSING and CONNECT_FAILED.latch is True


def test_a_frontend_walk_reaches_connected_and_reconnects():
    """Drive both ends with the table alone: a frontend like xen-scsifront (its state
    after seeing ours) against the backend's transitions."""
    be, connected, latched = S.INITIALISING, False, False
    t = start(be, S.INITIALISING)
    be = t.state or be

    def run(fe):
        nonlocal be, connected, latched
        t = step(be, fe, Facts(connected=connected, latched_close=latched))
        if A.CONNECT in t.actions:
            connected = True
        if A.DISCONNECT in t.actions:
            connected = False
        latched = latched if t.latch is None else t.latch
        be = t.state or be

    assert be == S.INIT_WAIT
    for fe in (S.INITIALISED, S.CONNECTED, S.CLOSING, S.CLOSED, S.INITIALISING,
               S.INITIALISED):
        run(fe)
    assert (be, connected) == (S.CONNECTED, True)
