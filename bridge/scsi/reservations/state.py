"""Persistent reservation state of one logical unit, and its APTPL file.

SPC-4 5.13.5 (persist through power loss): with APTPL the registrations and
the reservation survive a restart. The file is JSON, written atomically and
mode 0600 by state_file.py (temp file, fsync, rename, fsync of the directory);
reading it back either yields a state or raises ReservationStateError: a
damaged file is never silently ignored.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from ..state_file import remove_durably, write_atomically
from .table import ReservationType

STATE_FORMAT_VERSION = 1
_MAX_KEY = (1 << 64) - 1
_MAX_GENERATION = (1 << 32) - 1


class ReservationStateError(Exception):
    """The APTPL state file at ``path`` cannot be used, for ``reason``."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"persistent reservation state {path!r} refused: {reason}")
        self.path = path
        self.reason = reason


@dataclass
class Registration:
    """One registered I_T nexus (SPC-4 5.13.7); keyed by initiator port name."""

    initiator: str
    key: int
    all_tg_pt: bool = False


@dataclass
class Reservation:
    """The persistent reservation. ``holder`` is None for all-registrants types,
    whose holders are every registered I_T nexus (SPC-4 5.13.10)."""

    type: ReservationType
    holder: str | None
    scope: int = 0


@dataclass
class PrState:
    generation: int = 0
    registrations: dict[str, Registration] = field(default_factory=dict)  # in registration order
    reservation: Reservation | None = None
    aptpl: bool = False

    def copy(self) -> PrState:
        return copy.deepcopy(self)

    def holds(self, initiator: str) -> bool:
        """Is this I_T nexus a persistent reservation holder?"""
        res = self.reservation
        if res is None:
            return False
        if res.type.all_registrants:
            return initiator in self.registrations
        return res.holder == initiator

    def bump_generation(self) -> None:
        # SPC-4 6.15.2: PRGENERATION is a 32-bit wrapping counter.
        self.generation = (self.generation + 1) & _MAX_GENERATION

    # ------------------------------------------------------------ JSON form

    def to_json(self, lu_name: str) -> dict[str, Any]:
        res = self.reservation
        return {
            "version": STATE_FORMAT_VERSION,
            "lu": lu_name,
            "generation": self.generation,
            "aptpl": self.aptpl,
            "registrations": [
                {"initiator": r.initiator, "key": r.key, "all_tg_pt": r.all_tg_pt}
                for r in self.registrations.values()
            ],
            "reservation": None
            if res is None
            else {"type": int(res.type), "scope": res.scope, "holder": res.holder},
        }

    @classmethod
    def from_json(cls, data: Any, path: str) -> PrState:
        def bad(reason: str) -> ReservationStateError:
            return ReservationStateError(path, reason)

        def integer(v: Any, lo: int, hi: int, what: str) -> int:
            if type(v) is not int or not lo <= v <= hi:
                raise bad(f"{what} must be an integer in [{lo}, {hi}], got {v!r}")
            return v

        if not isinstance(data, dict):
            raise bad("top level is not an object")
        if data.get("version") != STATE_FORMAT_VERSION:
            raise bad(f"unsupported version {data.get('version')!r}")
        state = cls()
        state.generation = integer(data.get("generation"), 0, _MAX_GENERATION, "generation")
        if data.get("aptpl") is not True:
            raise bad("aptpl is not true (a state file exists only while APTPL is active)")
        state.aptpl = True
        regs = data.get("registrations")
        if not isinstance(regs, list):
            raise bad("registrations is not a list")
        for i, r in enumerate(regs):
            if not isinstance(r, dict):
                raise bad(f"registration {i} is not an object")
            name = r.get("initiator")
            if not isinstance(name, str) or not name:
                raise bad(f"registration {i} has no initiator name")
            if name in state.registrations:
                raise bad(f"initiator {name!r} registered twice")
            key = integer(r.get("key"), 1, _MAX_KEY, f"registration {i} key")
            atp = r.get("all_tg_pt")
            if not isinstance(atp, bool):
                raise bad(f"registration {i} all_tg_pt is not a boolean")
            state.registrations[name] = Registration(name, key, atp)
        res = data.get("reservation")
        if res is not None:
            if not isinstance(res, dict):
                raise bad("reservation is not an object")
            t = res.get("type")
            if type(t) is not int or t not in ReservationType._value2member_map_:
                raise bad(f"reservation type {t!r} is not a persistent reservation type")
            rtype = ReservationType(t)
            if res.get("scope") != 0:
                raise bad("reservation scope is not LU_SCOPE (0)")
            holder = res.get("holder")
            if rtype.all_registrants:
                if holder is not None:
                    raise bad("all-registrants reservation names a single holder")
                if not state.registrations:
                    raise bad("all-registrants reservation without registrants")
            elif not isinstance(holder, str) or holder not in state.registrations:
                raise bad(f"reservation holder {holder!r} is not registered")
            state.reservation = Reservation(rtype, holder, 0)
        return state


# ------------------------------------------------------------------ the file


def state_path_for(image_path: str) -> str:
    """Where the APTPL state of the LU on ``image_path`` lives: next to the image."""
    return image_path + ".pr.json"


def load_state(path: str) -> PrState | None:
    """The saved state, None when there is no file; ReservationStateError when damaged."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ReservationStateError(path, f"cannot read: {e.strerror}") from e
    if not raw:
        raise ReservationStateError(path, "file is empty (truncated)")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReservationStateError(path, f"not valid JSON (corrupt or truncated): {e}") from e
    return PrState.from_json(data, path)


def encode_state(state: PrState, lu_name: str) -> bytes:
    """The file's contents for ``state``."""
    return json.dumps(state.to_json(lu_name), indent=1, sort_keys=True).encode() + b"\n"


def save_state(path: str, payload: bytes) -> None:
    """Atomically replace the file with ``payload`` (encode_state): blocking, durable on return."""
    write_atomically(path, payload)


def remove_state(path: str) -> None:
    """APTPL turned off: the state no longer persists (SPC-4 5.13.5). Blocking."""
    remove_durably(path)
