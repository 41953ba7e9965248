"""The backend's xenbus state machine as data: everything that decides it lives here.

Xen's xenbus protocol (xen/include/public/io/xenbus.h) with the vscsi steps of
Linux's xen-scsiback (scsiback_frontend_changed: one case per frontend state;
Reconfiguring/Reconfigured for LUN hot-plug). Level-triggered: at each wake-up
the backend reads its own state, the frontend's and a few facts (``Facts``),
looks up the first matching ``Rule`` and applies its ``Transition``: the
actions in order, then the latch, then the new backend state (written only when
it differs), then stop. No I/O here; bridge/xen/backend.py performs the actions.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field

from bridge.xen.xenbus import XenbusState as S


class Action(enum.Enum):
    DISCONNECT = "disconnect"  # stop the ring service, unbind, unmap; I_T nexus loss
    CONNECT = "connect"  # map ring-ref, bind event-channel, serve the ring; may fail
    OFFER_FEATURES = "offer features"  # write feature-sg-grant (before InitWait)
    REOFFER_DEVS = "reoffer devs"  # devs 3/4 -> 1: a reconnecting frontend gets them again
    ADD_OR_DEL_LUNS = "add or del luns"  # VSCSIBACK_OP_ADD_OR_DEL_LUN: devs 1->3 (or 6), 5->6
    UPDATE_DEV_STATES = "update dev states"  # VSCSIBACK_OP_UPDATEDEV_STATE: devs 3->4
    REMOVE_CLOSED_DEVS = "remove closed devs"  # dev-N entries at 6 after a reconfiguration
    # Target LUN events for this initiator -> dev-N state 1 / 5 and Reconfiguring, in one
    # xenstore transaction (toolstack.reconfigure); writes the backend state itself.
    START_RECONFIGURATION = "start reconfiguration"


@dataclass(frozen=True)
class Facts:
    """What besides the two states decides a step."""

    online: bool = True  # backend "online" node; 0: the toolstack is detaching us
    connected: bool = False  # a ring is mapped and served
    broken: bool = False  # the ring service found the frontend breaking the ring protocol
    # The backend closed on its own (failed connect, broken ring, stale frontend): it
    # does not connect again until the frontend goes back to Initialising.
    latched_close: bool = False
    hotplug_pending: bool = False  # target LUN events not yet written to vscsi-devs


@dataclass(frozen=True)
class Transition:
    actions: tuple[Action, ...] = ()
    state: S | None = None  # new backend state; None: unchanged
    latch: bool | None = None  # new latched_close; None: unchanged
    stop: bool = False  # the backend's work is over (detached)
    note: str = ""  # logged when taken
    level: int = logging.INFO


NOTHING = Transition()


@dataclass(frozen=True)
class States:
    """A set of xenbus states, or its complement (a node may hold any integer: the
    frontend's state node is the guest's to write)."""

    states: frozenset[int]
    but: bool = False

    def __contains__(self, state: object) -> bool:
        return (state in self.states) != self.but


def _s(*states: S) -> States:
    return States(frozenset(states))


def _not(*states: S) -> States:
    return States(frozenset(states), but=True)


ANY = _not()


@dataclass(frozen=True)
class Rule:
    frontend: States
    backend: States
    then: Transition
    # Facts this rule requires (name -> value); facts not named do not matter.
    when: dict[str, bool] = field(default_factory=dict)

    def matches(self, backend: int, frontend: int, facts: Facts) -> bool:
        return frontend in self.frontend and backend in self.backend and \
            all(getattr(facts, k) == v for k, v in self.when.items())


_CLOSE = Transition(state=S.CLOSING, latch=True)

# Checked in order; the first match wins.
RULES: tuple[Rule, ...] = (
    # A frontend that broke its ring is disconnected alone (DESIGN: hostile guests).
    Rule(ANY, ANY, Transition((Action.DISCONNECT,), S.CLOSING, latch=True),
         {"broken": True}),
    # online=0: the toolstack is detaching us (detach: online=0, Closing); follow the
    # frontend down, and stop once it is closed.
    Rule(_s(S.CLOSING), ANY, Transition((Action.DISCONNECT,), S.CLOSING), {"online": False}),
    Rule(_s(S.CLOSED, S.UNKNOWN), _not(S.CLOSED),
         Transition((Action.DISCONNECT,), S.CLOSED, stop=True), {"online": False}),
    Rule(_s(S.CLOSED, S.UNKNOWN), _s(S.CLOSED), Transition((Action.DISCONNECT,)),
         {"online": False}),
    Rule(ANY, _not(S.CLOSING, S.CLOSED), Transition(state=S.CLOSING), {"online": False}),
    Rule(ANY, ANY, NOTHING, {"online": False}),
    # Initialising after Closing/Closed: a rebooted or reloaded frontend.
    Rule(_s(S.INITIALISING), _s(S.CLOSING, S.CLOSED),
         Transition((Action.DISCONNECT, Action.REOFFER_DEVS, Action.OFFER_FEATURES),
                    S.INIT_WAIT, latch=False,
                    note="frontend re-initialising, InitWait for a reconnect")),
    # Initialised: ring-ref and event-channel are published (scsiback_map).
    Rule(_s(S.INITIALISED), ANY,
         Transition((Action.CONNECT, Action.ADD_OR_DEL_LUNS), S.CONNECTED),
         {"connected": False, "latched_close": False}),
    # Connected.
    Rule(_s(S.CONNECTED), ANY, _CLOSE, {"connected": False, "latched_close": False}),
    Rule(_s(S.CONNECTED), _s(S.RECONFIGURING), NOTHING),  # the frontend has yet to follow
    Rule(_s(S.CONNECTED), _not(S.CONNECTED),
         Transition((Action.UPDATE_DEV_STATES, Action.REMOVE_CLOSED_DEVS), S.CONNECTED),
         {"connected": True}),
    Rule(_s(S.CONNECTED), _s(S.CONNECTED),
         Transition((Action.UPDATE_DEV_STATES, Action.START_RECONFIGURATION)),
         {"connected": True, "hotplug_pending": True}),
    Rule(_s(S.CONNECTED), _s(S.CONNECTED), Transition((Action.UPDATE_DEV_STATES,)),
         {"connected": True}),
    # Reconfiguring: the frontend took our Reconfiguring (scsiback_frontend_changed).
    Rule(_s(S.RECONFIGURING), _s(S.RECONFIGURING),
         Transition((Action.ADD_OR_DEL_LUNS,), S.RECONFIGURED), {"connected": True}),
    # Closing/Closed: drain and unmap, mirror the state (scsiback_disconnect).
    Rule(_s(S.CLOSING), ANY, Transition((Action.DISCONNECT,), S.CLOSING)),
    Rule(_s(S.CLOSED), ANY, Transition((Action.DISCONNECT,), S.CLOSED)),
    # The frontend's directory is gone: wait for the toolstack to remove ours.
    Rule(_s(S.UNKNOWN), ANY, Transition((Action.DISCONNECT,))),
)

# When CONNECT fails (no ring-ref/event-channel, a bad grant or port): close.
CONNECT_FAILED = _CLOSE


def step(backend: int, frontend: int, facts: Facts) -> Transition:
    """The transition for one wake-up."""
    for rule in RULES:
        if rule.matches(backend, frontend, facts):
            return rule.then
    return NOTHING


# At start, before the first step: a backend directory just written by the toolstack,
# or one a previous bridge instance served.
START_RULES: tuple[Rule, ...] = (
    Rule(ANY, _s(S.INIT_WAIT), NOTHING),
    Rule(ANY, _s(S.UNKNOWN, S.INITIALISING),
         Transition((Action.OFFER_FEATURES,), S.INIT_WAIT)),
    Rule(_s(S.UNKNOWN, S.INITIALISING, S.INIT_WAIT, S.INITIALISED, S.CLOSED), ANY,
         Transition((Action.OFFER_FEATURES,), S.INIT_WAIT)),
    # We have no ring for a frontend that believes it is connected (bridge restart).
    Rule(_s(S.CONNECTED), ANY, Transition(state=S.CLOSING, latch=True,
                                          note="frontend connected to a previous backend "
                                               "instance; closing", level=logging.WARNING)),
)


def start(backend: int, frontend: int) -> Transition:
    """The transition when the backend starts serving a device directory."""
    for rule in START_RULES:
        if rule.matches(backend, frontend, Facts()):
            return rule.then
    return NOTHING
