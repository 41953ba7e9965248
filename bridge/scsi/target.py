"""The SCSI target device: LUN maps per initiator, command dispatch, task management.

LUN addressing (virtio 1.2 5.6.6.1, SAM-5 4.7, as QEMU's virtio-scsi does it):
- a LUN field not in virtio's single-level form, or a target other than 0: virtio
  BAD_TARGET (there is no such target);
- target 0, a LUN not mapped for this initiator: INQUIRY answers peripheral qualifier
  011b / device type 1Fh (Linux's scan creates no device), REPORT LUNS works, REQUEST
  SENSE returns LOGICAL UNIT NOT SUPPORTED sense data, every other command gets CHECK
  CONDITION, ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (25h/00h);
- the REPORT LUNS well-known LUN (C101h) answers REPORT LUNS, INQUIRY, REQUEST SENSE
  and TEST UNIT READY.

Buffers (virtio 1.2 5.6.6.1 and QEMU's virtio_scsi_handle_cmd_req_prepare): both a
data-out and a data-in buffer -> virtio FAILURE (no bidirectional commands); a READ or
WRITE whose transfer needs more bytes than the buffer in its direction (and a
parameter list longer than the data-out buffer) -> virtio OVERRUN, nothing done; a
buffer longer than the transfer -> residual = buffer - transferred. Data-in shorter
than an allocation length is not an error: the data are truncated (SPC-4 4.2.5.6).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from time import perf_counter_ns
from typing import Any

from .alua import refusal
from .cdb import lu_not_supported
from .command import Command, CommandInfo, CommandTable, Overrun, check_cdb
from .command_families import COMMAND_TABLE
from .events import CapacityChanged, LunAdded, LunRemoved, TargetEvent
from .faults import FaultInjector
from .identity import TARGET_PORT_NAME
from .logical_unit import LogicalUnit, LogicalUnitSpec
from .ports import PortMap
from .request import (
    GOOD_RESPONSE,
    MAX_LUN,
    REPORT_LUNS_WLUN,
    ScsiRequest,
    ScsiResponse,
    ScsiStatus,
    ServiceResponse,
    TaskAttribute,
    TmfRequest,
    TmfResponse,
    TmfServiceResponse,
)
from .reservations.commands import ReservationConflictStatus
from .sense import SenseData, SenseError, SenseKey, invalid_opcode
from .statistics import Statistics
from .task_management import TASK_MANAGEMENT_FUNCTIONS
from .task_set import Task, TaskSet
from .unit_attention import (
    BUS_DEVICE_RESET_OCCURRED,
    CAPACITY_DATA_HAS_CHANGED,
    I_T_NEXUS_LOSS_OCCURRED,
    REPORTED_LUNS_DATA_HAS_CHANGED,
    UnitAttentions,
)

log = logging.getLogger(__name__)

INTERNAL_TARGET_FAILURE = SenseData(SenseKey.HARDWARE_ERROR, 0x44, 0x00)
ORDERING_ATTRIBUTES = frozenset((TaskAttribute.SIMPLE, TaskAttribute.ORDERED, TaskAttribute.HEAD))


class Target:
    def __init__(
        self,
        lus: list[LogicalUnitSpec],
        lun_maps: dict[str, dict[int, str]],
        target_port_name: str = TARGET_PORT_NAME,
        ports: PortMap | None = None,
    ) -> None:
        self.target_port_name = target_port_name
        # Target ports and groups (ports.py, ALUA alua.py); one port by default.
        self.ports = ports if ports is not None else PortMap.single(target_port_name)
        self.commands: CommandTable = COMMAND_TABLE
        self.unit_attentions = UnitAttentions()
        self._lus: dict[str, LogicalUnit] = {}
        self._maps: dict[str, dict[int, str]] = {}
        self._subscribers: list[Callable[[TargetEvent], None]] = []
        self.statistics: Statistics | None = None  # enable_statistics()
        # The fault injector while it has rules (bridge/scsi/faults.py), else None: the
        # submit path's only cost of fault injection is testing this attribute.
        self.faults: FaultInjector | None = None
        try:
            for spec in lus:
                self.add_logical_unit(spec)
            for initiator, mapping in lun_maps.items():
                for lun, name in mapping.items():
                    self._check_mapping(initiator, lun, name)
                    self._maps.setdefault(initiator, {})[lun] = name
        except BaseException:
            self.close()
            raise

    # -- configuration -------------------------------------------------------------

    def _check_mapping(self, initiator: str, lun: int, name: str) -> None:
        if not isinstance(lun, int) or not 0 <= lun <= MAX_LUN:
            raise ValueError(f"lun_maps[{initiator!r}]: LUN {lun!r} is not in 0..{MAX_LUN}")
        if name not in self._lus:
            raise ValueError(f"lun_maps[{initiator!r}][{lun}]: no logical unit named {name!r}")

    def add_logical_unit(self, spec: LogicalUnitSpec) -> None:
        if spec.name in self._lus:
            raise ValueError(f"name: logical unit {spec.name!r} defined twice")
        name = spec.name
        self._lus[name] = LogicalUnit(
            spec, lambda ini, asc, ascq: self.unit_attentions.establish(ini, name, (asc, ascq)))
        self._lus[name].reservations.ports = self.ports  # ALL_TG_PT, relative ports (ports.py)

    def logical_unit(self, name: str) -> LogicalUnit:
        return self._lus[name]

    def logical_units(self) -> list[LogicalUnit]:
        return list(self._lus.values())

    def lun_maps(self) -> dict[str, dict[int, str]]:
        """Initiator port name -> {LUN: LU name}, a copy."""
        return {ini: dict(m) for ini, m in self._maps.items()}

    def remove_logical_unit(self, name: str) -> None:
        """Close and forget an LU that no initiator sees and that has no task in flight."""
        lu = self._lus[name]
        if self.nexuses_of(name):
            raise ValueError(f"logical unit {name!r} is mapped")
        if len(lu.tasks):
            raise ValueError(f"logical unit {name!r} has commands in flight")
        del self._lus[name]
        self.unit_attentions.forget_lu(name)
        lu.close()

    def enable_statistics(self) -> Statistics:
        """Count every command from now on (bridge.scsi.statistics)."""
        if self.statistics is None:
            self.statistics = Statistics(self)
        return self.statistics

    def luns_for(self, initiator: str) -> list[int]:
        return sorted(self._maps.get(initiator, {}))

    def _lu_at(self, initiator: str, lun: int) -> LogicalUnit | None:
        name = self._maps.get(initiator, {}).get(lun)
        return self._lus.get(name) if name is not None else None

    def nexuses_of(self, lu_name: str) -> list[tuple[str, int]]:
        """Every (initiator, LUN) through which ``lu_name`` is seen."""
        return [(ini, lun) for ini, m in self._maps.items() for lun, n in m.items() if n == lu_name]

    def subscribe(self, callback: Callable[[TargetEvent], None]) -> None:
        self._subscribers.append(callback)

    def unsubscribe(self, callback: Callable[[TargetEvent], None]) -> None:
        """Stop delivering events to ``callback`` (a transport instance that ended)."""
        try:
            self._subscribers.remove(callback)
        except ValueError:
            pass

    def _emit(self, event: TargetEvent) -> None:
        log.info("event %s", event)
        for cb in list(self._subscribers):
            try:
                cb(event)
            except Exception:
                log.exception("event subscriber failed on %s", event)

    def map_lun(self, initiator: str, lun: int, lu_name: str) -> None:
        """Hot-add: SPC-4 REPORTED LUNS DATA HAS CHANGED on the initiator's other LUs."""
        self._check_mapping(initiator, lun, lu_name)
        self._maps.setdefault(initiator, {})[lun] = lu_name
        for other, name in self._maps[initiator].items():
            if other != lun:
                self.unit_attentions.establish(initiator, name, REPORTED_LUNS_DATA_HAS_CHANGED)
        self._emit(LunAdded(initiator, lun))

    def unmap_lun(self, initiator: str, lun: int) -> None:
        """Hot-remove: abort the nexus's tasks, UA 3Fh/0Eh on the initiator's other LUs."""
        mapping = self._maps.get(initiator, {})
        name = mapping.pop(lun, None)
        if name is None:
            raise KeyError(f"{initiator!r} has no LUN {lun}")
        lu = self._lus[name]
        for t in lu.tasks.matching(initiator, lun):
            t.aborted = True
            t.scope.cancel()
        for other_name in mapping.values():
            self.unit_attentions.establish(initiator, other_name, REPORTED_LUNS_DATA_HAS_CHANGED)
        self._emit(LunRemoved(initiator, lun))

    def resize(self, lu_name: str, new_size: int) -> None:
        """CAPACITY DATA HAS CHANGED (SBC-3 4.8) to every nexus seeing the LU."""
        lu = self._lus[lu_name]
        if new_size <= 0 or new_size % lu.block_size:
            raise ValueError(f"size: {new_size} is not a positive multiple of {lu.block_size}")
        lu.resize(new_size)
        for initiator, lun in self.nexuses_of(lu_name):
            self.unit_attentions.establish(initiator, lu_name, CAPACITY_DATA_HAS_CHANGED)
            self._emit(CapacityChanged(initiator, lun))

    def nexus_loss(self, initiator: str) -> None:
        """SAM-5 6.3.4 I_T nexus loss: abort its tasks, drop SPC-2 reservations, UA 29h/07h."""
        for name in set(self._maps.get(initiator, {}).values()):
            lu = self._lus[name]
            for t in lu.tasks.matching(initiator):
                t.aborted = t.by_reset = True
                t.scope.cancel()
            lu.reservations.nexus_loss(initiator)
            lu.prevent_removal.discard(initiator)  # SPC-4 6.13: per I_T nexus state
            self.unit_attentions.establish(initiator, name, I_T_NEXUS_LOSS_OCCURRED)
        log.info("I_T nexus loss for %s", initiator)

    def clear_ua_for_initiator(self, initiator: str, asc_ascq: tuple[int, int]) -> None:
        for name in set(self._maps.get(initiator, {}).values()):
            self.unit_attentions.clear(initiator, name, asc_ascq)

    def close(self) -> None:
        for lu in self._lus.values():
            lu.close()

    # -- commands ------------------------------------------------------------------

    async def execute(self, req: ScsiRequest) -> ScsiResponse:
        """Run one command; always returns a well-formed response, never raises
        (except trio.Cancelled from the caller's own cancellation).

        A READ/WRITE served from the page cache completes without a trio checkpoint
        (that is its speed); transports checkpoint in their own request loops.
        Task attributes SIMPLE, ORDERED and HEAD OF QUEUE are honoured (task_set.py).
        """
        started = self.submit(req)
        if type(started) is ScsiResponse:
            return started
        return await started

    def submit(self, req: ScsiRequest) -> ScsiResponse | Coroutine[Any, Any, ScsiResponse]:
        """Start one command without blocking: its response when it completed at once
        (a page-cache READ/WRITE, every error), else a coroutine that finishes it as an
        abortable task. Never raises, and neither does the coroutine (except
        trio.Cancelled). A transport that gets a coroutine must await it: from submit on
        the command holds its place in the LU's task order (an ORDERED command arriving
        later waits for it), and gives it up when the coroutine ends.
        """
        stats = self.statistics
        t0 = perf_counter_ns() if stats is not None else 0
        try:
            started = self._submit(req)
        except Exception:
            started = self._internal_error(req)
        if type(started) is ScsiResponse:
            if stats is not None:
                stats.record(req, started, perf_counter_ns() - t0)
            return started
        return self._finish(req, started, t0)

    async def _finish(self, req: ScsiRequest, rest: Coroutine[Any, Any, ScsiResponse],
                      t0: int = 0) -> ScsiResponse:
        try:
            resp = await rest
        except Exception:
            resp = self._internal_error(req)
        if not self.ports.port_for(req).up:
            # The port went down meanwhile: the status is lost with the link (ports.py).
            resp = ScsiResponse(ServiceResponse.PORT_DOWN)
        stats = self.statistics
        if stats is not None:
            stats.record(req, resp, perf_counter_ns() - t0)
        return resp

    @staticmethod
    def _internal_error(req: ScsiRequest) -> ScsiResponse:
        log.exception("internal error executing CDB %s", bytes(req.cdb[:16]).hex()
                      if isinstance(req.cdb, bytes | bytearray | memoryview) else "?")
        return ScsiResponse(ServiceResponse.TARGET_FAILURE, ScsiStatus.CHECK_CONDITION,
                            INTERNAL_TARGET_FAILURE.encode())

    def _submit(self, req: ScsiRequest) -> ScsiResponse | Coroutine[Any, Any, ScsiResponse]:
        in_len = sum(map(len, req.data_in))  # req.data_in_len, without a generator
        out_len = sum(map(len, req.data_out))
        if in_len and out_len:
            # The core has no bidirectional commands (virtio: VIRTIO_SCSI_F_INOUT not offered).
            return ScsiResponse(ServiceResponse.SERVICE_DELIVERY_FAILURE)
        port = self.ports.port_for(req)
        if not port.up:
            return ScsiResponse(ServiceResponse.PORT_DOWN)  # ports.py: a failed link
        lun = req.lun
        lu = None if lun == REPORT_LUNS_WLUN else self._lu_at(req.initiator.name, lun)
        cdb = req.cdb
        cmd = Command(self, req, cdb if type(cdb) is bytes else bytes(cdb), lu, lun, in_len,
                      out_len)
        cmd.port = port
        if lu is None:
            return self._run_without_lu(cmd)
        return self._run(cmd, lu)

    def _check_condition(self, cmd: Command, sense: SenseData, lu: LogicalUnit | None
                         ) -> ScsiResponse:
        descriptor = lu.mode.d_sense if lu is not None else False
        return ScsiResponse(ServiceResponse.COMMAND_COMPLETE, ScsiStatus.CHECK_CONDITION,
                            sense.encode(descriptor), cmd.residual)

    async def _run_without_lu(self, cmd: Command) -> ScsiResponse:
        """Unmapped LUN or the REPORT LUNS well-known LUN (see the module docstring)."""
        wlun = cmd.lun == REPORT_LUNS_WLUN
        try:
            if not wlun and cmd.cdb[:1] not in (b"\x12", b"\xa0", b"\x03"):
                raise lu_not_supported()
            info = self.commands.lookup(cmd.cdb)
            if not info.allowed_without_lu:
                raise invalid_opcode()
            cmd.cdb = check_cdb(info, cmd.cdb)
            cmd.info = info
            status = await info.handler(cmd)
        except SenseError as e:
            return self._check_condition(cmd, e.sense, None)
        except Overrun:
            return ScsiResponse(ServiceResponse.DATA_OVERRUN, residual=cmd.in_len or cmd.out_len)
        return ScsiResponse(ServiceResponse.COMMAND_COMPLETE, status or ScsiStatus.GOOD, b"", cmd.residual)

    def _run(self, cmd: Command, lu: LogicalUnit
             ) -> ScsiResponse | Coroutine[Any, Any, ScsiResponse]:
        initiator = cmd.initiator
        info = None
        lookup_error: SenseError | None = None
        try:
            info = self.commands.lookup(cmd.cdb)
        except SenseError as e:
            lookup_error = e
        # SAM-5 5.14: a pending unit attention fails every command except INQUIRY,
        # REPORT LUNS and REQUEST SENSE, before anything else is looked at.
        if info is None or not info.allowed_with_ua:
            ua = self.unit_attentions.pop(initiator, lu.name)
            if ua is not None:
                return self._check_condition(cmd, ua, lu)
        if info is None:
            assert lookup_error is not None
            return self._check_condition(cmd, lookup_error.sense, lu)
        try:
            cmd.cdb = check_cdb(info, cmd.cdb)
        except SenseError as e:
            return self._check_condition(cmd, e.sense, lu)
        cmd.info = info
        state = cmd.port.group.state
        if state:  # SPC-4 5.15.2: not active/optimized; alua.py's table decides
            refused = refusal(state, cmd.cdb)
            if refused is not None:
                return self._check_condition(cmd, refused, lu)
        if lu.stopped and info.medium:
            # SBC-3 5.25: stopped by START STOP UNIT until a START UNIT.
            return self._check_condition(cmd, SenseData(SenseKey.NOT_READY, 0x04, 0x02), lu)
        if info.medium and (blocked := lu.sanitize.blocking_sense()) is not None:
            return self._check_condition(cmd, blocked, lu)  # SBC-3 4.11: sanitize
        # SPC-4 5.13: reservation conflicts answer RESERVATION CONFLICT without sense.
        if lu.reservations.conflicts(initiator, cmd.cdb):
            return ScsiResponse(ServiceResponse.COMMAND_COMPLETE, ScsiStatus.RESERVATION_CONFLICT, b"",
                                cmd.residual)
        attr = cmd.req.task_attr
        if attr not in ORDERING_ATTRIBUTES:
            # SAM-5 8.6.5: no ACA (NormACA=0, NACA=1 refused), so no ACA task attribute;
            # refused like an invalid CDB field, as LIO does.
            return self._check_condition(cmd, SenseData(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00), lu)
        faults = self.faults
        if faults is not None:
            injected = faults.intercept(cmd, info, lu)
            if injected is not None:
                return injected
        if info.fast is not None and lu.tasks.may_run_now(attr):
            # Completes without yielding, so it cannot be aborted half-way and needs no
            # entry in the task set (nor the cost of a cancel scope).
            try:
                if info.fast(cmd):
                    residual = cmd.residual
                    if not residual:
                        return GOOD_RESPONSE  # never changed: one for every GOOD
                    return ScsiResponse(ServiceResponse.COMMAND_COMPLETE, ScsiStatus.GOOD, b"",
                                        residual)
            except SenseError as e:
                return self._check_condition(cmd, e.sense, lu)
            except Overrun:
                return ScsiResponse(ServiceResponse.DATA_OVERRUN, residual=cmd.in_len or cmd.out_len)
            cmd.in_done = cmd.out_done = 0
        return self.run_as_task(cmd, info, lu)

    def run_as_task(self, cmd: Command, info: CommandInfo, lu: LogicalUnit
                    ) -> Coroutine[Any, Any, ScsiResponse]:
        """The command as an abortable task of the LU's task set; its place in the task
        attribute order is taken now, on arrival (task_set.py)."""
        attr = cmd.req.task_attr
        return self._run_task(cmd, info, lu, attr, lu.tasks.arrive(attr))

    async def _run_task(self, cmd: Command, info: CommandInfo, lu: LogicalUnit, attr: int,
                        seq: int) -> ScsiResponse:
        task = Task(cmd.initiator, cmd.lun, cmd.req.tag)
        tasks = lu.tasks
        if not tasks.add(task):
            tasks.leave(seq)
            # SAM-5 5.10: OVERLAPPED COMMANDS ATTEMPTED for a tag already in use.
            return self._check_condition(cmd, SenseData(SenseKey.ABORTED_COMMAND, 0x4E, 0x00), lu)
        status: int | None = None
        sense: SenseData | None = None
        overrun = False
        try:
            with task.scope:
                try:
                    await tasks.wait_enabled(seq, attr)  # dormant, abortable (SAM-5 8.7)
                    status = await info.handler(cmd)
                except SenseError as e:
                    sense = e.sense
                except Overrun:
                    overrun = True
                except ReservationConflictStatus:
                    status = ScsiStatus.RESERVATION_CONFLICT
        finally:
            tasks.remove(task)
            tasks.leave(seq)
        if task.aborted:
            return ScsiResponse(ServiceResponse.TASK_ABORTED_BY_RESET if task.by_reset
                                else ServiceResponse.TASK_ABORTED, residual=cmd.in_len or cmd.out_len)
        if overrun:
            return ScsiResponse(ServiceResponse.DATA_OVERRUN, residual=cmd.in_len or cmd.out_len)
        if sense is not None:
            return self._check_condition(cmd, sense, lu)
        return ScsiResponse(ServiceResponse.COMMAND_COMPLETE, status or ScsiStatus.GOOD, b"", cmd.residual)

    # -- task management -----------------------------------------------------------

    async def task_management(self, tmf: TmfRequest) -> TmfResponse:
        """SAM-5 7, through the table in task_management.py; never raises."""
        try:
            response = await self._task_management(tmf)
        except Exception:
            log.exception("internal error in TMF %s", tmf.function)
            response = TmfServiceResponse.SERVICE_DELIVERY_OR_TARGET_FAILURE
        log.info("TMF %s from %s on LUN %d tag %#x: %s", tmf.function.name, tmf.initiator.name,
                 tmf.lun, tmf.tag, response.name)
        if self.statistics is not None:
            self.statistics.record_tmf(tmf, response)
        return TmfResponse(response)

    async def _task_management(self, tmf: TmfRequest) -> TmfServiceResponse:
        initiator = tmf.initiator.name
        log.info("TMF %s from %s on LUN %d tag %#x", tmf.function.name, initiator, tmf.lun,
                 tmf.tag)
        if not self.ports.port_of_nexus(initiator).up:
            return TmfServiceResponse.SERVICE_DELIVERY_OR_TARGET_FAILURE  # ports.py
        info = TASK_MANAGEMENT_FUNCTIONS.get(tmf.function)
        if info is None:
            return TmfServiceResponse.FUNCTION_REJECTED
        if info.handler is None:  # I_T NEXUS RESET: every LU of the nexus
            await self._i_t_nexus_reset(initiator)
            return TmfServiceResponse.FUNCTION_COMPLETE
        lu = self._lu_at(initiator, tmf.lun)
        if lu is None:
            return TmfServiceResponse.INCORRECT_LOGICAL_UNIT_NUMBER
        return await info.handler(self, tmf, lu)

    async def logical_unit_reset(self, lu: LogicalUnit) -> None:
        """SAM-5 6.3.3: abort every task, SPC-2 release, back to the power-on state (mode
        parameters from their saved values, unit started, removal allowed), UA 29h/03h
        for every nexus."""
        await TaskSet.abort(lu.tasks.matching(), by_reset=True)
        lu.reservations.logical_unit_reset()
        lu.prevent_removal.clear()
        was_wce = lu.mode.wce
        lu.mode.restore_saved()
        if was_wce and not lu.mode.wce:
            await lu.backing.flush()
        lu.stopped = False
        for initiator, _lun in self.nexuses_of(lu.name):
            self.unit_attentions.establish(initiator, lu.name, BUS_DEVICE_RESET_OCCURRED)

    async def _i_t_nexus_reset(self, initiator: str) -> None:
        """SAM-5 6.3.4 I_T NEXUS RESET: like an I_T nexus loss, but waits for the aborts."""
        tasks: list[Task] = []
        for name in set(self._maps.get(initiator, {}).values()):
            tasks.extend(self._lus[name].tasks.matching(initiator))
        await TaskSet.abort(tasks, by_reset=True)
        self.nexus_loss(initiator)
