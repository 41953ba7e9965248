"""SCSI-3 persistent reservations (SPC-4 5.13) and SPC-2 RESERVE/RELEASE, per logical unit.

One PersistentReservations object per LU. The target core asks
``conflicts()`` before running any command, and sends PERSISTENT RESERVE
IN/OUT and RESERVE/RELEASE(6/10) to ``handle()``. The service actions
themselves are sans-I/O functions (pr_out.py, pr_in.py); this class holds the
current state, commits new states and keeps the SPC-2 reservation.

I_T nexus identity: every attachment is one initiator port and one target port
(bridge/scsi/ports.py), so an I_T nexus is named by its initiator port name alone;
``ports`` (the Target's PortMap) says which target port each is through (READ FULL
STATUS), which initiator ports are one initiator's (ALL_TG_PT) and resolves REGISTER
AND MOVE's (TransportID, relative target port).

Call every method from the trio loop. Commands that change state (PERSISTENT
RESERVE OUT, RESERVE/RELEASE) run one at a time per LU, in arrival order (a FIFO
trio.Lock): each is decided on the state its predecessor committed. With APTPL
active, a PR OUT writes and fsyncs the state file in a worker thread (the event
loop keeps serving other commands) and its new state becomes current, and the
command completes, only once the file is durable. Until then conflict checks and
PR IN see the previous state: the PR OUT has not completed.

Decisions where the standard leaves room (documented, tested):
- CRH=1 (SPC-4 5.13.3): while any registration exists, RESERVE/RELEASE(6/10)
  from a reservation holder, or from a registrant under a registrants-only or
  all-registrants reservation, complete GOOD without effect; from anyone else
  they get RESERVATION CONFLICT. Without registrations they follow SPC-2.
- While an SPC-2 reservation is held, PERSISTENT RESERVE IN/OUT conflict from
  every I_T nexus, the holder included (SPC-2 5.5.1).
- A successful REGISTER / REGISTER AND IGNORE EXISTING KEY bumps PRGENERATION
  even when it changes nothing (unregistered nexus, key 0): "every time a
  PERSISTENT RESERVE OUT command requests" that service action (SPC-4 6.15.2).
- An APTPL write failure fails the command with HARDWARE ERROR / INTERNAL
  TARGET FAILURE and leaves the in-memory state unchanged.
- A PR OUT aborted while its state file is being written still commits that
  state (the write is not interrupted); it may complete TASK ABORTED with its
  effect in place, which SAM-5 allows for an aborted command.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import trio

from ..request import InitiatorPort
from ..sense import SenseError, SenseKey, invalid_field_in_cdb, invalid_opcode
from ..state_file import discard_stale_temp
from .codec import PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT
from .pr_in import pr_in
from .pr_out import (
    ASC_RESERVATIONS,
    ASCQ_RESERVATIONS_PREEMPTED,
    SINGLE_PORT,
    PortDirectory,
    ReservationConflict,
    apply_pr_out,
)
from .state import PrState, encode_state, load_state, remove_state, save_state
from .table import SPC2_ALLOWED_FROM_OTHERS, command_key, conflict_row

__all__ = ["PersistentReservations", "ReservationConflict", "pr_in_cdb", "pr_out_cdb"]

RESERVE_6 = 0x16
RESERVE_10 = 0x56
RELEASE_6 = 0x17
RELEASE_10 = 0x57
SPC2_OPCODES = frozenset({RESERVE_6, RESERVE_10, RELEASE_6, RELEASE_10})
HANDLED_OPCODES = frozenset({PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT}) | SPC2_OPCODES


def _internal_target_failure() -> SenseError:
    """HARDWARE ERROR, INTERNAL TARGET FAILURE (44h/00h)."""
    return SenseError(SenseKey.HARDWARE_ERROR, 0x44, 0x00)


class PersistentReservations:
    """Persistent reservations and SPC-2 reservations of one logical unit."""

    def __init__(
        self,
        lu_name: str,
        state_path: str | None,
        unit_attention: Callable[[str, int, int], None],
    ) -> None:
        self.lu_name = lu_name
        self.state_path = state_path
        self._unit_attention = unit_attention
        self._spc2_holder: str | None = None
        self._state = PrState()
        # The target's ports (set by the Target): relative ports in READ FULL STATUS,
        # ALL_TG_PT, REGISTER AND MOVE to another port.
        self.ports: PortDirectory = SINGLE_PORT
        # Serializes the commands that change state; trio.Lock is fair (FIFO).
        self._changes = trio.Lock()
        if state_path is not None:
            # A temp file is a write that never got renamed: never acknowledged.
            discard_stale_temp(state_path)
            loaded = load_state(state_path)
            if loaded is not None:
                # SPC-4 6.15.2: a power on sets PRgeneration to zero "regardless of the
                # APTPL bit value"; the APTPL registrations and reservation come back.
                loaded.generation = 0
                self._state = loaded

    # ------------------------------------------------------------ conflicts

    def conflicts(self, initiator: str, cdb: bytes) -> bool:
        """True when this command from this I_T nexus must get RESERVATION CONFLICT."""
        if not cdb:
            return False
        op = cdb[0]
        st = self._state
        if self._spc2_holder is None and st.reservation is None and op not in SPC2_OPCODES:
            return False  # the common case, on every I/O: nothing reserved
        cdb = bytes(cdb)
        if self._spc2_holder is not None:
            if op in (PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT):
                return True  # SPC-2 5.5.1: regardless of initiator
            if initiator == self._spc2_holder:
                return False
            return command_key(cdb) not in SPC2_ALLOWED_FROM_OTHERS
        if op in SPC2_OPCODES:
            return bool(st.registrations) and not self._crh_exempt(initiator)
        res = st.reservation
        if res is None or st.holds(initiator):
            return False
        return not conflict_row(cdb).allows(res.type, initiator in st.registrations)

    def _crh_exempt(self, initiator: str) -> bool:
        """SPC-4 5.13.3: RESERVE/RELEASE that complete GOOD without effect."""
        st = self._state
        if st.holds(initiator):
            return True
        res = st.reservation
        return (
            res is not None
            and (res.type.registrants_only or res.type.all_registrants)
            and initiator in st.registrations
        )

    # --------------------------------------------------------------- handle

    async def handle(
        self,
        initiator: InitiatorPort,
        cdb: bytes,
        data_out: bytes | memoryview | list[memoryview],
        alloc_len_in: int,
    ) -> tuple[bytes, list[str]]:
        """Run PR IN/OUT or RESERVE/RELEASE(6/10); returns (data-in, initiators to abort).

        ``data_out`` may be bytes, a memoryview or a list of them (the
        request's data-out buffers); it is copied once, never kept.
        """
        cdb = bytes(cdb)
        if isinstance(data_out, (list, tuple)):
            data_out = b"".join(bytes(b) for b in data_out)
        if not cdb or cdb[0] not in HANDLED_OPCODES:
            raise invalid_opcode()
        op = cdb[0]
        if op == PERSISTENT_RESERVE_IN:
            self._check_no_spc2_reservation()
            return pr_in(self._state, cdb, alloc_len_in, self.state_path is not None,
                         self.ports), []
        data = bytes(data_out)
        async with self._changes:
            if op == PERSISTENT_RESERVE_OUT:
                self._check_no_spc2_reservation()
                return b"", await self._pr_out(initiator.name, cdb, data)
            self._spc2(initiator.name, cdb)
            return b"", []

    def _check_no_spc2_reservation(self) -> None:
        if self._spc2_holder is not None:
            raise ReservationConflict("SPC-2 reservation held (SPC-2 5.5.1)")

    # --------------------------------------------------------------- PR OUT

    async def _pr_out(self, me: str, cdb: bytes, data_out: bytes) -> list[str]:
        new, fx = apply_pr_out(self._state, me, cdb, data_out, self.state_path is not None,
                               self.ports)
        await self._commit(new)
        for name, ascq in fx.unit_attentions:
            self._unit_attention(name, ASC_RESERVATIONS, ascq)
        return fx.aborts

    async def _commit(self, new: PrState) -> None:
        """Make ``new`` durable (when APTPL says so), then current.

        The file work runs in a worker thread; a cancellation does not interrupt
        it (trio.to_thread.run_sync waits for the thread), so the file and the
        state in memory never disagree about an acknowledged command.
        """
        path = self.state_path
        if path is not None and (new.aptpl or self._state.aptpl):
            try:
                if new.aptpl:
                    payload = encode_state(new, self.lu_name)
                    await trio.to_thread.run_sync(save_state, path, payload)
                else:
                    await trio.to_thread.run_sync(remove_state, path)
            except OSError as e:
                raise _internal_target_failure() from e
        self._state = new

    # ---------------------------------------------------- SPC-2 RESERVE/RELEASE

    def _spc2(self, me: str, cdb: bytes) -> None:
        op = cdb[0]
        need = 6 if op in (RESERVE_6, RELEASE_6) else 10
        if len(cdb) < need:
            raise invalid_field_in_cdb(0)
        b1 = cdb[1]
        # SPC-2 7.21/7.24 (RESERVE/RELEASE(10)): third-party and long-ID forms
        # unsupported; SCSI-2 extent reservations (bit 0) are obsolete.
        if b1 & 0x10:
            raise invalid_field_in_cdb(1, 4)
        if op in (RESERVE_10, RELEASE_10) and b1 & 0x02:
            raise invalid_field_in_cdb(1, 1)
        if b1 & 0x01:
            raise invalid_field_in_cdb(1, 0)
        if self._state.registrations:
            if self._crh_exempt(me):
                return  # SPC-4 5.13.3: GOOD, nothing changes
            raise ReservationConflict("RESERVE/RELEASE while registrations exist")
        if op in (RESERVE_6, RESERVE_10):
            if self._spc2_holder not in (None, me):
                raise ReservationConflict(f"reserved by {self._spc2_holder}")
            self._spc2_holder = me
        elif self._spc2_holder == me:
            self._spc2_holder = None

    # ------------------------------------------------------------- events

    def nexus_loss(self, initiator: str) -> None:
        """SPC-4: registrations survive an I_T nexus loss; an SPC-2 reservation does not."""
        if self._spc2_holder == initiator:
            self._spc2_holder = None

    def logical_unit_reset(self) -> None:
        """SPC-2 5.5.1: a LOGICAL UNIT RESET releases the SPC-2 reservation; PR unaffected."""
        self._spc2_holder = None

    async def clear_all(self) -> None:
        """An administrator's CLEAR (the control plane's pr.clear, like targetcli's): every
        registration and both reservations go, APTPL ends (the state file is removed), and
        registrants get RESERVATIONS PREEMPTED as after a PR OUT CLEAR (SPC-4 5.13.11.6).
        Ordered with the PR OUTs of this LU; HARDWARE ERROR sense when the file stays."""
        async with self._changes:
            new = self._state.copy()
            names = list(new.registrations)
            new.registrations.clear()
            new.reservation = None
            new.bump_generation()
            new.aptpl = False
            await self._commit(new)
            self._spc2_holder = None
            for n in names:
                self._unit_attention(n, ASC_RESERVATIONS, ASCQ_RESERVATIONS_PREEMPTED)

    # ------------------------------------------------------------- status

    def status(self) -> dict:
        st = self._state
        res = st.reservation
        holder: str | None
        if res is None:
            holder = None
        elif res.holder is None:
            holder = "all registrants"
        else:
            holder = res.holder
        return {
            "lu": self.lu_name,
            "generation": st.generation,
            "aptpl": st.aptpl,
            "registrants": [
                {"initiator": r.initiator, "key": f"0x{r.key:016x}", "all_tg_pt": r.all_tg_pt}
                for r in st.registrations.values()
            ],
            "holder": holder,
            "type": None if res is None else res.type.short_name,
            "spc2_holder": self._spc2_holder,
        }


def pr_out_cdb(
    service_action: int, rtype: int = 0, parameter_list_length: int = 24, scope: int = 0
) -> bytes:
    """Build a PERSISTENT RESERVE OUT CDB (helper for tests and tools)."""
    return struct.pack(
        ">BBBHIB",
        PERSISTENT_RESERVE_OUT,
        service_action,
        (scope << 4) | rtype,
        0,
        parameter_list_length,
        0,
    )


def pr_in_cdb(service_action: int, allocation_length: int = 0xFFFF) -> bytes:
    """Build a PERSISTENT RESERVE IN CDB (helper for tests and tools)."""
    return struct.pack(">BB5xHB", PERSISTENT_RESERVE_IN, service_action, allocation_length, 0)
