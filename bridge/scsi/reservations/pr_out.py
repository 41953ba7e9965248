"""PERSISTENT RESERVE OUT service actions (SPC-4 5.13.7-5.13.11, 6.16) as state transitions.

Sans-I/O: ``apply_pr_out`` takes the current state and a command and returns the
new state (a copy) with the effects to apply once it is committed (unit
attentions, initiators whose tasks are aborted); it never changes its input and
never touches a file. Committing, durably when APTPL says so, is
persistent_reservations.py's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..sense import SenseError, SenseKey, invalid_field_in_cdb, invalid_field_in_parameter_list
from .codec import (
    PrOutAction,
    PrOutCdb,
    PrOutParameters,
    RegisterAndMoveParameters,
    parse_pr_out_cdb,
    parse_pr_out_parameters,
    parse_register_and_move_parameters,
)
from .state import PrState, Registration, Reservation
from .table import ReservationType

# SPC-4 table of ASC/ASCQ: unit attentions the service actions establish.
ASC_RESERVATIONS = 0x2A
ASCQ_RESERVATIONS_PREEMPTED = 0x03
ASCQ_RESERVATIONS_RELEASED = 0x04
ASCQ_REGISTRATIONS_PREEMPTED = 0x05

LU_SCOPE = 0
MAX_REGISTRATIONS = 1024  # bound on guest-created state


class PortDirectory(Protocol):
    """What reservations need to know of the target's ports (bridge/scsi/ports.PortMap)."""

    def relative_id_of(self, initiator_port: str) -> int: ...

    def siblings(self, initiator_port: str) -> list[str]: ...

    def resolve(self, transport_name: str, relative_id: int) -> str | None: ...

    def has_port(self, relative_id: int) -> bool: ...


class _SinglePort:
    """One target port (relative id 1): every I_T nexus is named by its initiator port."""

    def relative_id_of(self, initiator_port: str) -> int:
        return 1

    def siblings(self, initiator_port: str) -> list[str]:
        return [initiator_port]

    def resolve(self, transport_name: str, relative_id: int) -> str | None:
        return transport_name if relative_id == 1 else None

    def has_port(self, relative_id: int) -> bool:
        return relative_id == 1


SINGLE_PORT: PortDirectory = _SinglePort()


class ReservationConflict(Exception):
    """The command ends with RESERVATION CONFLICT status (SAM-5 5.3)."""


def _invalid_release() -> SenseError:
    """ILLEGAL REQUEST, INVALID RELEASE OF PERSISTENT RESERVATION (26h/04h), SPC-4 5.13.11.2."""
    return SenseError(SenseKey.ILLEGAL_REQUEST, 0x26, 0x04)


def _insufficient_registration_resources() -> SenseError:
    """ILLEGAL REQUEST, INSUFFICIENT REGISTRATION RESOURCES (55h/04h), SPC-4 5.13.7."""
    return SenseError(SenseKey.ILLEGAL_REQUEST, 0x55, 0x04)


@dataclass
class Effects:
    """What a PR OUT does besides changing the state, applied only after commit."""

    unit_attentions: list[tuple[str, int]] = field(default_factory=list)  # (initiator, ascq)
    aborts: list[str] = field(default_factory=list)

    def ua(self, names: list[str] | set[str], ascq: int) -> None:
        for n in names:
            self.unit_attentions.append((n, ascq))


def apply_pr_out(state: PrState, me: str, cdb: bytes, data_out: bytes, aptpl_capable: bool,
                 ports: PortDirectory = SINGLE_PORT) -> tuple[PrState, Effects]:
    """The state after PERSISTENT RESERVE OUT ``cdb`` from I_T nexus ``me``, and its effects.

    Raises ReservationConflict or SenseError (the state is then unchanged).
    ``aptpl_capable``: the LU has a state file, so APTPL=1 is accepted. ``ports``: the
    target's ports (ALL_TG_PT, SPEC_I_PT and REGISTER AND MOVE name nexuses through them).
    """
    pcdb = parse_pr_out_cdb(cdb)
    sa = pcdb.service_action
    new = state.copy()
    fx = Effects()
    if sa == PrOutAction.REGISTER_AND_MOVE:
        rm = parse_register_and_move_parameters(pcdb, data_out)
        _check_aptpl(rm.aptpl, aptpl_capable, 17)
        _register_and_move(new, me, rm, ports)
        new.aptpl = rm.aptpl
    else:
        p = parse_pr_out_parameters(pcdb, data_out)
        if sa in (PrOutAction.REGISTER, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY):
            _check_aptpl(p.aptpl, aptpl_capable, 20)
            _register(new, me, p, sa == PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, fx, ports)
            new.aptpl = p.aptpl  # SPC-4 6.16.3: APTPL only counts for register actions
        elif sa == PrOutAction.RESERVE:
            _reserve(new, me, pcdb, p)
        elif sa == PrOutAction.RELEASE:
            _release(new, me, pcdb, p, fx)
        elif sa == PrOutAction.CLEAR:
            _clear(new, me, p, fx)
        else:
            _preempt(new, me, pcdb, p, fx, abort=sa == PrOutAction.PREEMPT_AND_ABORT)
    return new, fx


def _check_aptpl(aptpl: bool, capable: bool, byte: int) -> None:
    if aptpl and not capable:
        raise invalid_field_in_parameter_list(byte, 0)


def _registered(new: PrState, me: str, reservation_key: int) -> Registration:
    """The caller's registration; RESERVATION CONFLICT if absent or the key differs."""
    reg = new.registrations.get(me)
    if reg is None:
        raise ReservationConflict(f"{me} is not registered")
    if reg.key != reservation_key:
        raise ReservationConflict(f"RESERVATION KEY mismatch for {me}")
    return reg


def _scope_and_type(pcdb: PrOutCdb) -> ReservationType:
    if pcdb.scope != LU_SCOPE:
        raise invalid_field_in_cdb(2, 7)
    if pcdb.type not in ReservationType._value2member_map_:
        raise invalid_field_in_cdb(2, 3)
    return ReservationType(pcdb.type)


def _register(new: PrState, me: str, p: PrOutParameters, ignore_existing: bool, fx: Effects,
              ports: PortDirectory = SINGLE_PORT) -> None:
    """SPC-4 5.13.7 and its table of REGISTER behaviours.

    ALL_TG_PT=1 (SPC-4 6.16.3) registers the initiator through every target port: here
    every initiator port of the same initiator name (one guest's paths, ports.py) that is
    not registered yet gets the key, each as its own I_T nexus; a later REGISTER (new key
    or unregister) from any of them applies to all its ALL_TG_PT registrations."""
    reg = new.registrations.get(me)
    sakey = p.service_action_key
    if reg is None:
        if not ignore_existing and p.reservation_key != 0:
            raise ReservationConflict(f"{me} unregistered but RESERVATION KEY is not zero")
        if sakey != 0:
            names = [me]
            if p.all_tg_pt:
                names += [n for n in ports.siblings(me)[1:] if n not in new.registrations]
            if p.spec_i_pt:
                # All or nothing: every TransportID must name an unregistered nexus
                # (through this target port, SPC-4 6.16.3).
                here = ports.relative_id_of(me)
                for tid, offset in zip(p.transport_ids, p.transport_id_offsets, strict=True):
                    name = ports.resolve(tid, here)
                    if name is None:
                        raise invalid_field_in_parameter_list(offset)
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
        group = [me]
        if reg.all_tg_pt:
            group += [n for n in ports.siblings(me)[1:]
                      if n in new.registrations and new.registrations[n].all_tg_pt]
        for name in group:
            if sakey == 0:
                _unregister(new, name, fx)
            else:
                new.registrations[name].key = sakey
    new.bump_generation()


def _unregister(new: PrState, me: str, fx: Effects) -> None:
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


def _reserve(new: PrState, me: str, pcdb: PrOutCdb, p: PrOutParameters) -> None:
    """SPC-4 5.13.9: creating a persistent reservation."""
    rtype = _scope_and_type(pcdb)
    _registered(new, me, p.reservation_key)
    res = new.reservation
    if res is None:
        new.reservation = Reservation(rtype, None if rtype.all_registrants else me, LU_SCOPE)
    elif not new.holds(me) or res.type != rtype or res.scope != pcdb.scope:
        raise ReservationConflict("a different persistent reservation exists")


def _release(new: PrState, me: str, pcdb: PrOutCdb, p: PrOutParameters, fx: Effects) -> None:
    """SPC-4 5.13.11.2: releasing the persistent reservation."""
    _registered(new, me, p.reservation_key)
    res = new.reservation
    if res is None or not new.holds(me):
        return  # GOOD, nothing released
    if pcdb.scope != res.scope or pcdb.type != int(res.type):
        raise _invalid_release()
    new.reservation = None
    if res.type.registrants_only or res.type.all_registrants:
        fx.ua([n for n in new.registrations if n != me], ASCQ_RESERVATIONS_RELEASED)


def _clear(new: PrState, me: str, p: PrOutParameters, fx: Effects) -> None:
    """SPC-4 5.13.11.6: CLEAR removes every registration and the reservation."""
    _registered(new, me, p.reservation_key)
    fx.ua([n for n in new.registrations if n != me], ASCQ_RESERVATIONS_PREEMPTED)
    new.registrations.clear()
    new.reservation = None
    new.bump_generation()


def _preempt(
    new: PrState,
    me: str,
    pcdb: PrOutCdb,
    p: PrOutParameters,
    fx: Effects,
    abort: bool,
) -> None:
    """SPC-4 5.13.11.4 (PREEMPT) and 5.13.11.5 (PREEMPT AND ABORT)."""
    # SCOPE and TYPE matter only when a reservation is taken over; when
    # only registrations are removed they are ignored (SPC-4 5.13.11.4.4).
    _registered(new, me, p.reservation_key)
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
        rtype = _scope_and_type(pcdb)
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


def _register_and_move(new: PrState, me: str, rm: RegisterAndMoveParameters,
                       ports: PortDirectory = SINGLE_PORT) -> None:
    """SPC-4 5.13.8: moving the reservation to another I_T nexus, named by a TransportID
    and a RELATIVE TARGET PORT IDENTIFIER (6.16.4)."""
    _registered(new, me, rm.reservation_key)
    res = new.reservation
    if res is None or res.type.all_registrants or res.holder != me:
        raise ReservationConflict("REGISTER AND MOVE needs the caller to hold the reservation")
    if rm.service_action_key == 0:
        raise invalid_field_in_parameter_list(8)
    if not ports.has_port(rm.relative_target_port):
        raise invalid_field_in_parameter_list(18)
    dest = ports.resolve(rm.transport_id, rm.relative_target_port)
    if dest is None:  # that initiator has no I_T nexus through that target port
        raise invalid_field_in_parameter_list(24)
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
