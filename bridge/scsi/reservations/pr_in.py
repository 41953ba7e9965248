"""PERSISTENT RESERVE IN service actions (SPC-4 6.15): the state, encoded. Sans-I/O."""

from __future__ import annotations

from ..sense import invalid_field_in_cdb
from .codec import (
    TYPE_MASK_BITS,
    Capabilities,
    FullStatusEntry,
    PrInAction,
    encode_iscsi_transport_id,
    encode_read_full_status,
    encode_read_keys,
    encode_read_reservation,
    pr_in_allocation_length,
)
from .pr_out import SINGLE_PORT, PortDirectory
from .state import PrState
from .table import ReservationType

# SPC-4 6.15.4 ALLOW COMMANDS 011b: TEST UNIT READY is allowed through WE and EA,
# and MODE SENSE, READ ATTRIBUTE, READ BUFFER, RECEIVE COPY RESULTS, RECEIVE
# DIAGNOSTIC RESULTS, REPORT SUPPORTED OPERATION CODES, REPORT SUPPORTED TASK
# MANAGEMENT FUNCTIONS and READ DEFECT DATA are allowed through Write Exclusive.
ALLOW_COMMANDS = 0b011


def capabilities(state: PrState, ptpl_capable: bool) -> Capabilities:
    """SPC-4 6.15.4 REPORT CAPABILITIES."""
    mask = 0
    for t in ReservationType:
        mask |= TYPE_MASK_BITS[int(t)]
    return Capabilities(
        crh=True,
        sip_c=True,
        atp_c=True,
        ptpl_c=ptpl_capable,
        tmv=True,
        allow_commands=ALLOW_COMMANDS,
        ptpl_a=state.aptpl,
        type_mask=mask,
    )


def full_status(state: PrState, ports: PortDirectory = SINGLE_PORT) -> list[FullStatusEntry]:
    """SPC-4 6.15.5 READ FULL STATUS: one descriptor per registered I_T nexus, with the
    relative target port it is registered through."""
    res = state.reservation
    out = []
    for r in state.registrations.values():
        holder = state.holds(r.initiator)
        out.append(
            FullStatusEntry(
                key=r.key,
                all_tg_pt=r.all_tg_pt,
                holder=holder,
                scope=res.scope if holder and res else 0,
                type=int(res.type) if holder and res else 0,
                relative_target_port=ports.relative_id_of(r.initiator),
                transport_id=encode_iscsi_transport_id(r.initiator),
            )
        )
    return out


def pr_in(state: PrState, cdb: bytes, alloc_len_in: int, ptpl_capable: bool,
          ports: PortDirectory = SINGLE_PORT) -> bytes:
    """The parameter data of PERSISTENT RESERVE IN ``cdb``, cut to the allocation length."""
    if len(cdb) < 10:
        raise invalid_field_in_cdb(0)
    sa = cdb[1] & 0x1F
    if sa == PrInAction.READ_KEYS:
        data = encode_read_keys(state.generation, [r.key for r in state.registrations.values()])
    elif sa == PrInAction.READ_RESERVATION:
        res = state.reservation
        if res is None:
            data = encode_read_reservation(state.generation, None)
        else:
            # SPC-4 6.15.3.2: all-registrants types report key 0.
            key = 0 if res.holder is None else state.registrations[res.holder].key
            data = encode_read_reservation(state.generation, (key, res.scope, int(res.type)))
    elif sa == PrInAction.REPORT_CAPABILITIES:
        data = capabilities(state, ptpl_capable).encode()
    elif sa == PrInAction.READ_FULL_STATUS:
        data = encode_read_full_status(state.generation, full_status(state, ports))
    else:
        raise invalid_field_in_cdb(1, 4)
    limit = min(pr_in_allocation_length(cdb), max(alloc_len_in, 0))
    return data[:limit]
