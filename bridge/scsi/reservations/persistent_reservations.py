"""SCSI-3 persistent reservations (SPC-4 5.13) and SPC-2 RESERVE/RELEASE, per logical unit.

One PersistentReservations object per LU. The target core asks
``conflicts()`` before running any command, and sends PERSISTENT RESERVE
IN/OUT and RESERVE/RELEASE(6/10) to ``handle()``.

I_T nexus identity: a single target port (relative target port identifier
1), so an I_T nexus is named by its initiator port name alone; ALL_TG_PT=1
is accepted and means that one port.

Not thread-safe: call every method from one thread (the trio loop). With
APTPL active, a PR OUT writes and fsyncs the state file before it returns.

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
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from ..request import InitiatorPort
from ..sense import (
    SenseError,
    SenseKey,
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
    invalid_opcode,
)
from .codec import (
    PERSISTENT_RESERVE_IN,
    PERSISTENT_RESERVE_OUT,
    TYPE_MASK_BITS,
    Capabilities,
    FullStatusEntry,
    PrInAction,
    PrOutAction,
    PrOutCdb,
    PrOutParameters,
    RegisterAndMoveParameters,
    encode_iscsi_transport_id,
    encode_read_full_status,
    encode_read_keys,
    encode_read_reservation,
    parse_pr_out_cdb,
    parse_pr_out_parameters,
    parse_register_and_move_parameters,
    pr_in_allocation_length,
)
from .state import (
    PrState,
    Registration,
    Reservation,
    ReservationStateError,
    load_state,
    remove_state,
    save_state,
    temp_path,
)
from .table import (
    SPC2_ALLOWED_FROM_OTHERS,
    ConflictRow,
    ReservationType,
    command_key,
    conflict_row,
    conflict_table_rows,
)

__all__ = [
    "ConflictRow",
    "PersistentReservations",
    "ReservationConflict",
    "ReservationStateError",
    "ReservationType",
    "conflict_table_rows",
]

RESERVE_6 = 0x16
RESERVE_10 = 0x56
RELEASE_6 = 0x17
RELEASE_10 = 0x57
SPC2_OPCODES = frozenset({RESERVE_6, RESERVE_10, RELEASE_6, RELEASE_10})
HANDLED_OPCODES = frozenset({PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT}) | SPC2_OPCODES

# SPC-4 table of ASC/ASCQ: unit attentions this module establishes.
ASC_RESERVATIONS = 0x2A
ASCQ_RESERVATIONS_PREEMPTED = 0x03
ASCQ_RESERVATIONS_RELEASED = 0x04
ASCQ_REGISTRATIONS_PREEMPTED = 0x05

LU_SCOPE = 0
RELATIVE_TARGET_PORT = 1  # our only target port
MAX_REGISTRATIONS = 1024  # bound on guest-created state

# SPC-4 6.15.4 ALLOW COMMANDS 011b: TEST UNIT READY is allowed through WE and EA,
# and MODE SENSE, READ ATTRIBUTE, READ BUFFER, RECEIVE COPY RESULTS, RECEIVE
# DIAGNOSTIC RESULTS, REPORT SUPPORTED OPERATION CODES, REPORT SUPPORTED TASK
# MANAGEMENT FUNCTIONS and READ DEFECT DATA are allowed through Write Exclusive.
ALLOW_COMMANDS = 0b011


class ReservationConflict(Exception):
    """The command ends with RESERVATION CONFLICT status (SAM-5 5.3)."""


def _invalid_release() -> SenseError:
    """ILLEGAL REQUEST, INVALID RELEASE OF PERSISTENT RESERVATION (26h/04h), SPC-4 5.13.11.2."""
    return SenseError(SenseKey.ILLEGAL_REQUEST, 0x26, 0x04)


def _insufficient_registration_resources() -> SenseError:
    """ILLEGAL REQUEST, INSUFFICIENT REGISTRATION RESOURCES (55h/04h), SPC-4 5.13.7."""
    return SenseError(SenseKey.ILLEGAL_REQUEST, 0x55, 0x04)


def _internal_target_failure() -> SenseError:
    """HARDWARE ERROR, INTERNAL TARGET FAILURE (44h/00h)."""
    return SenseError(SenseKey.HARDWARE_ERROR, 0x44, 0x00)


@dataclass
class _Effects:
    """What a PR OUT does besides changing the state, applied only after commit."""

    unit_attentions: list[tuple[str, int]] = field(default_factory=list)  # (initiator, ascq)
    aborts: list[str] = field(default_factory=list)

    def ua(self, names: list[str] | set[str], ascq: int) -> None:
        for n in names:
            self.unit_attentions.append((n, ascq))


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
        if state_path is not None:
            # A temp file is a write that never got renamed: never acknowledged.
            try:
                os.unlink(temp_path(state_path))
            except FileNotFoundError:
                pass
            loaded = load_state(state_path)
            if loaded is not None:
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

    def handle(
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
        if op in (PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT) and self._spc2_holder is not None:
            raise ReservationConflict("SPC-2 reservation held (SPC-2 5.5.1)")
        if op == PERSISTENT_RESERVE_IN:
            return self._pr_in(cdb, alloc_len_in), []
        if op == PERSISTENT_RESERVE_OUT:
            return b"", self._pr_out(initiator, cdb, bytes(data_out))
        self._spc2(initiator.name, cdb)
        return b"", []

    # ---------------------------------------------------------------- PR IN

    def _pr_in(self, cdb: bytes, alloc_len_in: int) -> bytes:
        if len(cdb) < 10:
            raise invalid_field_in_cdb(0)
        sa = cdb[1] & 0x1F
        st = self._state
        if sa == PrInAction.READ_KEYS:
            data = encode_read_keys(st.generation, [r.key for r in st.registrations.values()])
        elif sa == PrInAction.READ_RESERVATION:
            res = st.reservation
            if res is None:
                data = encode_read_reservation(st.generation, None)
            else:
                # SPC-4 6.15.3.2: all-registrants types report key 0.
                key = 0 if res.holder is None else st.registrations[res.holder].key
                data = encode_read_reservation(st.generation, (key, res.scope, int(res.type)))
        elif sa == PrInAction.REPORT_CAPABILITIES:
            data = self.capabilities().encode()
        elif sa == PrInAction.READ_FULL_STATUS:
            data = encode_read_full_status(st.generation, self._full_status())
        else:
            raise invalid_field_in_cdb(1, 4)
        limit = min(pr_in_allocation_length(cdb), max(alloc_len_in, 0))
        return data[:limit]

    def capabilities(self) -> Capabilities:
        mask = 0
        for t in ReservationType:
            mask |= TYPE_MASK_BITS[int(t)]
        return Capabilities(
            crh=True,
            sip_c=True,
            atp_c=True,
            ptpl_c=self.state_path is not None,
            tmv=True,
            allow_commands=ALLOW_COMMANDS,
            ptpl_a=self._state.aptpl,
            type_mask=mask,
        )

    def _full_status(self) -> list[FullStatusEntry]:
        st = self._state
        res = st.reservation
        out = []
        for r in st.registrations.values():
            holder = st.holds(r.initiator)
            out.append(
                FullStatusEntry(
                    key=r.key,
                    all_tg_pt=r.all_tg_pt,
                    holder=holder,
                    scope=res.scope if holder and res else 0,
                    type=int(res.type) if holder and res else 0,
                    relative_target_port=RELATIVE_TARGET_PORT,
                    transport_id=encode_iscsi_transport_id(r.initiator),
                )
            )
        return out

    # --------------------------------------------------------------- PR OUT

    def _pr_out(self, initiator: InitiatorPort, cdb: bytes, data_out: bytes) -> list[str]:
        pcdb = parse_pr_out_cdb(cdb)
        sa = pcdb.service_action
        me = initiator.name
        new = self._state.copy()
        fx = _Effects()
        if sa == PrOutAction.REGISTER_AND_MOVE:
            rm = parse_register_and_move_parameters(pcdb, data_out)
            self._check_aptpl(rm.aptpl, 17)
            self._register_and_move(new, me, rm)
            new.aptpl = rm.aptpl
        else:
            p = parse_pr_out_parameters(pcdb, data_out)
            if sa in (PrOutAction.REGISTER, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY):
                self._check_aptpl(p.aptpl, 20)
                self._register(new, me, p, sa == PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, fx)
                new.aptpl = p.aptpl  # SPC-4 6.16.3: APTPL only counts for register actions
            elif sa == PrOutAction.RESERVE:
                self._reserve(new, me, pcdb, p)
            elif sa == PrOutAction.RELEASE:
                self._release(new, me, pcdb, p, fx)
            elif sa == PrOutAction.CLEAR:
                self._clear(new, me, p, fx)
            else:
                self._preempt(new, me, pcdb, p, fx, abort=sa == PrOutAction.PREEMPT_AND_ABORT)
        self._commit(new)
        for name, ascq in fx.unit_attentions:
            self._unit_attention(name, ASC_RESERVATIONS, ascq)
        return fx.aborts

    def _check_aptpl(self, aptpl: bool, byte: int) -> None:
        if aptpl and self.state_path is None:
            raise invalid_field_in_parameter_list(byte, 0)

    def _commit(self, new: PrState) -> None:
        """Make ``new`` durable (when APTPL says so), then current."""
        if self.state_path is not None:
            try:
                if new.aptpl:
                    save_state(self.state_path, new, self.lu_name)
                elif self._state.aptpl:
                    remove_state(self.state_path)
            except OSError as e:
                raise _internal_target_failure() from e
        self._state = new

    @staticmethod
    def _registered(new: PrState, me: str, reservation_key: int) -> Registration:
        """The caller's registration; RESERVATION CONFLICT if absent or the key differs."""
        reg = new.registrations.get(me)
        if reg is None:
            raise ReservationConflict(f"{me} is not registered")
        if reg.key != reservation_key:
            raise ReservationConflict(f"RESERVATION KEY mismatch for {me}")
        return reg

    @staticmethod
    def _scope_and_type(pcdb: PrOutCdb) -> ReservationType:
        if pcdb.scope != LU_SCOPE:
            raise invalid_field_in_cdb(2, 7)
        if pcdb.type not in ReservationType._value2member_map_:
            raise invalid_field_in_cdb(2, 3)
        return ReservationType(pcdb.type)

    def _register(
        self, new: PrState, me: str, p: PrOutParameters, ignore_existing: bool, fx: _Effects
    ) -> None:
        """SPC-4 5.13.7 and its table of REGISTER behaviours."""
        reg = new.registrations.get(me)
        sakey = p.service_action_key
        if reg is None:
            if not ignore_existing and p.reservation_key != 0:
                raise ReservationConflict(f"{me} unregistered but RESERVATION KEY is not zero")
            if sakey != 0:
                names = [me]
                if p.spec_i_pt:
                    # All or nothing: every TransportID must name an unregistered nexus.
                    for name, offset in zip(p.transport_ids, p.transport_id_offsets, strict=True):
                        if name != me and name in new.registrations:
                            raise invalid_field_in_parameter_list(offset)
                        if name not in names:
                            names.append(name)
                if len(new.registrations) + len(names) > MAX_REGISTRATIONS:
                    raise _insufficient_registration_resources()
                for name in names:
                    new.registrations[name] = Registration(name, sakey, p.all_tg_pt)
        else:
            if not ignore_existing and p.reservation_key != reg.key:
                raise ReservationConflict(f"RESERVATION KEY mismatch for {me}")
            if p.spec_i_pt:
                # SPC-4 table "REGISTER behaviours": registered I_T nexus with SPEC_I_PT=1.
                raise SenseError(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
            if sakey == 0:
                self._unregister(new, me, fx)
            else:
                reg.key = sakey
        new.bump_generation()

    @staticmethod
    def _unregister(new: PrState, me: str, fx: _Effects) -> None:
        """SPC-4 5.13.11.3: removing a registration may release the reservation."""
        was_holder = new.holds(me)
        del new.registrations[me]
        res = new.reservation
        if res is None or not was_holder:
            return
        if res.type.all_registrants:
            if not new.registrations:
                new.reservation = None  # the last holder left
            return
        new.reservation = None
        if res.type.registrants_only:
            fx.ua(list(new.registrations), ASCQ_RESERVATIONS_RELEASED)

    def _reserve(self, new: PrState, me: str, pcdb: PrOutCdb, p: PrOutParameters) -> None:
        """SPC-4 5.13.9: creating a persistent reservation."""
        rtype = self._scope_and_type(pcdb)
        self._registered(new, me, p.reservation_key)
        res = new.reservation
        if res is None:
            new.reservation = Reservation(rtype, None if rtype.all_registrants else me, LU_SCOPE)
        elif not new.holds(me) or res.type != rtype or res.scope != pcdb.scope:
            raise ReservationConflict("a different persistent reservation exists")

    def _release(
        self, new: PrState, me: str, pcdb: PrOutCdb, p: PrOutParameters, fx: _Effects
    ) -> None:
        """SPC-4 5.13.11.2: releasing the persistent reservation."""
        self._registered(new, me, p.reservation_key)
        res = new.reservation
        if res is None or not new.holds(me):
            return  # GOOD, nothing released
        if pcdb.scope != res.scope or pcdb.type != int(res.type):
            raise _invalid_release()
        new.reservation = None
        if res.type.registrants_only or res.type.all_registrants:
            fx.ua([n for n in new.registrations if n != me], ASCQ_RESERVATIONS_RELEASED)

    def _clear(self, new: PrState, me: str, p: PrOutParameters, fx: _Effects) -> None:
        """SPC-4 5.13.11.6: CLEAR removes every registration and the reservation."""
        self._registered(new, me, p.reservation_key)
        fx.ua([n for n in new.registrations if n != me], ASCQ_RESERVATIONS_PREEMPTED)
        new.registrations.clear()
        new.reservation = None
        new.bump_generation()

    def _preempt(
        self,
        new: PrState,
        me: str,
        pcdb: PrOutCdb,
        p: PrOutParameters,
        fx: _Effects,
        abort: bool,
    ) -> None:
        """SPC-4 5.13.11.4 (PREEMPT) and 5.13.11.5 (PREEMPT AND ABORT)."""
        # SCOPE and TYPE matter only when a reservation is taken over; when
        # only registrations are removed they are ignored (SPC-4 5.13.11.4.4).
        self._registered(new, me, p.reservation_key)
        sakey = p.service_action_key
        res = new.reservation

        # SPC-4 5.13.11.4.1 (figure "PREEMPT service action"): either the
        # reservation is preempted (5.13.11.4.3) or only registrations are
        # removed (5.13.11.4.4).
        preempts_reservation = res is not None and (
            (res.type.all_registrants and sakey == 0)
            or (res.holder is not None and new.registrations[res.holder].key == sakey)
        )
        if sakey == 0 and not preempts_reservation:
            raise invalid_field_in_parameter_list(8)
        if preempts_reservation:
            assert res is not None
            rtype = self._scope_and_type(pcdb)
            # Every registration named by the key (every one, for an all-registrants
            # reservation preempted with key 0) goes, except the caller's.
            victims = [
                n
                for n, r in new.registrations.items()
                if n != me and (sakey == 0 or r.key == sakey)
            ]
            for n in victims:
                del new.registrations[n]
            new.reservation = Reservation(rtype, None if rtype.all_registrants else me, LU_SCOPE)
            fx.ua(victims, ASCQ_REGISTRATIONS_PREEMPTED)
            if (rtype, LU_SCOPE) != (res.type, res.scope):
                fx.ua([n for n in new.registrations if n != me], ASCQ_RESERVATIONS_RELEASED)
        else:
            # Removing registrations: every I_T nexus with the key, the caller's
            # own included; the UA goes to the others only.
            victims = [n for n, r in new.registrations.items() if r.key == sakey]
            if not victims:
                raise ReservationConflict("SERVICE ACTION RESERVATION KEY matches no registrant")
            for n in victims:
                del new.registrations[n]
            victims = [n for n in victims if n != me]
            fx.ua(victims, ASCQ_REGISTRATIONS_PREEMPTED)
            if res is not None and res.type.all_registrants and not new.registrations:
                new.reservation = None  # the last all-registrants holder is gone
        if abort:
            # The caller's own tasks (this PR OUT among them) are left alone.
            fx.aborts.extend(victims)
        new.bump_generation()

    def _register_and_move(self, new: PrState, me: str, rm: RegisterAndMoveParameters) -> None:
        """SPC-4 5.13.8: moving the reservation to another I_T nexus."""
        self._registered(new, me, rm.reservation_key)
        res = new.reservation
        if res is None or res.type.all_registrants or res.holder != me:
            raise ReservationConflict("REGISTER AND MOVE needs the caller to hold the reservation")
        if rm.service_action_key == 0:
            raise invalid_field_in_parameter_list(8)
        if rm.relative_target_port != RELATIVE_TARGET_PORT:
            raise invalid_field_in_parameter_list(18)
        dest = rm.transport_id
        if dest == me:
            raise invalid_field_in_parameter_list(24)
        reg = new.registrations.get(dest)
        if reg is None:
            if len(new.registrations) >= MAX_REGISTRATIONS:
                raise _insufficient_registration_resources()
            new.registrations[dest] = Registration(dest, rm.service_action_key, False)
        else:
            reg.key = rm.service_action_key
        new.reservation = Reservation(res.type, dest, res.scope)
        if rm.unreg:
            del new.registrations[me]
        new.bump_generation()

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
