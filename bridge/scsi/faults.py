"""Fault injection: rules that make chosen commands of a logical unit fail, stall or hang.

A ``FaultRule`` (plain data) names an LU and, optionally, an initiator port, an opcode
class (read, write, other) and an LBA range; its action is one of:

- a CHECK CONDITION with sense data (``medium_error`` 03h/11h/00h, ``hardware_error``
  04h/44h/00h, ``not_ready`` 02h/04h/00h, ``aborted_command`` 0Bh/00h/00h, or
  ``check_condition`` with any key/ASC/ASCQ). For MEDIUM ERROR and HARDWARE ERROR on a
  READ or WRITE the INFORMATION field (VALID=1) holds the first failing LBA and, as a
  disk does, the blocks before it are transferred (SBC-3 error reporting: the
  INFORMATION field of an unrecovered error is the LBA of the block in error; Linux's
  sd completes the bytes before that LBA as good, so they must be real data);
- a status without sense: ``busy`` (08h) or ``task_set_full`` (28h) (SAM-5 5.3);
- ``delay``: the command waits ``delay_ms`` and then runs (a write is written only after
  the delay, so an abort during the delay writes nothing);
- ``hang``: the command waits until it is aborted, its LU is reset, its nexus is lost
  or the rule is removed (then it runs). With ``abort_fails`` an ABORT TASK for it is
  answered FUNCTION REJECTED and the command stays (an initiator escalates to LOGICAL
  UNIT RESET, which aborts it).

``count`` limits a rule to its next N hits; ``every`` makes it hit every Nth matching
command only. The first rule (in id order) that hits decides; rules are checked after
the unit-attention, CDB, NOT READY (stopped) and reservation checks, i.e. where the
device server would start the medium access.

Delayed and hung commands run as tasks in the LU's task set like any other command:
ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET, I_T NEXUS RESET,
nexus loss and PREEMPT AND ABORT end them with TASK ABORTED before the TMF completes.

The target holds a ``FaultInjector``; ``Target.faults`` is that injector only while it
has rules, so with no rules the submit path pays one attribute test.
"""

from __future__ import annotations

import enum
import itertools
import logging
import struct
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import trio

from .command import Command, CommandInfo
from .request import ScsiStatus
from .sbc import check_range, rw_fields
from .sense import SenseError, SenseKey

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from .logical_unit import LogicalUnit
    from .request import ScsiResponse
    from .target import Target

log = logging.getLogger(__name__)

# The opcode classes; the same sets as bridge/scsi/statistics.py counts as reads and
# writes (SBC-3 READ 6/10/12/16; WRITE 6/10/12/16, WRITE AND VERIFY 10/12/16).
READ_OPCODES = frozenset((0x08, 0x28, 0xA8, 0x88))
WRITE_OPCODES = frozenset((0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E))
OP_CLASSES = ("read", "write", "other")


class FaultAction(enum.Enum):
    MEDIUM_ERROR = "medium_error"
    HARDWARE_ERROR = "hardware_error"
    NOT_READY = "not_ready"
    ABORTED_COMMAND = "aborted_command"
    CHECK_CONDITION = "check_condition"
    BUSY = "busy"
    TASK_SET_FULL = "task_set_full"
    DELAY = "delay"
    HANG = "hang"


# Default (sense key, ASC, ASCQ) of the sense actions (SPC-4 4.5.6, table of ASC/ASCQ).
DEFAULT_SENSE: dict[FaultAction, tuple[int, int, int]] = {
    FaultAction.MEDIUM_ERROR: (SenseKey.MEDIUM_ERROR, 0x11, 0x00),  # UNRECOVERED READ ERROR
    FaultAction.HARDWARE_ERROR: (SenseKey.HARDWARE_ERROR, 0x44, 0x00),  # INTERNAL TARGET FAILURE
    FaultAction.NOT_READY: (SenseKey.NOT_READY, 0x04, 0x00),  # LU NOT READY, CAUSE NOT REPORTABLE
    FaultAction.ABORTED_COMMAND: (SenseKey.ABORTED_COMMAND, 0x00, 0x00),
}
_STATUS = {FaultAction.BUSY: ScsiStatus.BUSY, FaultAction.TASK_SET_FULL: ScsiStatus.TASK_SET_FULL}
# Sense keys whose INFORMATION field reports the failing LBA (and whose blocks before it
# are transferred).
_LBA_SENSE_KEYS = (SenseKey.MEDIUM_ERROR, SenseKey.HARDWARE_ERROR)
MAX_DELAY_MS = 3_600_000


@dataclass(frozen=True)
class FaultRule:
    """One fault rule, as data (the control plane's ``fault.add`` parameters)."""

    lu: str
    action: FaultAction
    initiator: str | None = None  # an initiator port name; None: every initiator
    op: str | None = None  # "read" | "write" | "other"; None: every command
    lba_first: int | None = None  # inclusive range of LBAs; a command hits when it touches it
    lba_last: int | None = None
    sense_key: int | None = None  # check_condition (required), or to override a preset
    asc: int | None = None
    ascq: int | None = None
    delay_ms: int | None = None  # delay (required)
    count: int | None = None  # at most this many hits, then the rule is spent
    every: int | None = None  # hit every Nth matching command (1: each)
    abort_fails: bool = False  # hang: ABORT TASK is answered FUNCTION REJECTED

    def validate(self) -> None:
        """Raise ValueError naming the first bad field ("field: what is wrong")."""
        if not isinstance(self.action, FaultAction):
            raise ValueError(f"action: must be one of {', '.join(a.value for a in FaultAction)}")
        if self.op is not None and self.op not in OP_CLASSES:
            raise ValueError(f"op: must be one of {', '.join(OP_CLASSES)}")
        for name in ("lba_first", "lba_last"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < 1 << 64:
                raise ValueError(f"{name}: must be an LBA (0 to 2^64-1)")
        if (self.lba_first is None) != (self.lba_last is None):
            raise ValueError("lba_first: give both lba_first and lba_last (an inclusive range)")
        if self.lba_first is not None:
            assert self.lba_last is not None
            if self.lba_last < self.lba_first:
                raise ValueError("lba_last: must not be below lba_first")
            if self.op == "other":
                raise ValueError("op: an LBA range matches only reads and writes, not 'other'")
        for name, top in (("sense_key", 0xF), ("asc", 0xFF), ("ascq", 0xFF)):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= top:
                raise ValueError(f"{name}: must be between 0 and {top:#x}")
        if self.sense_key is not None and self.sense_key not in SenseKey.__members__.values():
            raise ValueError(f"sense_key: {self.sense_key:#x} is not a sense key of SPC-4 table 43")
        sense_actions = (*DEFAULT_SENSE, FaultAction.CHECK_CONDITION)
        if self.action not in sense_actions and (
                self.sense_key, self.asc, self.ascq) != (None, None, None):
            raise ValueError(f"sense_key: only the sense actions take sense data, not {self.action.value}")
        if self.action is FaultAction.CHECK_CONDITION:
            if self.sense_key is None or self.asc is None:
                raise ValueError("sense_key: check_condition needs sense_key and asc (ascq: 0)")
            if self.sense_key in (SenseKey.NO_SENSE, SenseKey.UNIT_ATTENTION):
                raise ValueError("sense_key: NO SENSE and UNIT ATTENTION are not faults to inject")
        if self.action is FaultAction.DELAY:
            if self.delay_ms is None or not 1 <= self.delay_ms <= MAX_DELAY_MS:
                raise ValueError(f"delay_ms: delay needs delay_ms between 1 and {MAX_DELAY_MS}")
        elif self.delay_ms is not None:
            raise ValueError("delay_ms: only the delay action takes delay_ms")
        if self.abort_fails and self.action is not FaultAction.HANG:
            raise ValueError("abort_fails: only the hang action takes abort_fails")
        for name in ("count", "every"):
            v = getattr(self, name)
            if v is not None and not 1 <= v <= 1 << 32:
                raise ValueError(f"{name}: must be a positive integer")

    def sense(self) -> tuple[int, int, int]:
        key, asc, ascq = DEFAULT_SENSE.get(self.action, (self.sense_key or 0, self.asc or 0, 0))
        return (key if self.sense_key is None else self.sense_key,
                asc if self.asc is None else self.asc,
                ascq if self.ascq is None else self.ascq)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["action"] = self.action.value
        return {k: v for k, v in d.items() if v is not None and v is not False}


@dataclass(eq=False)
class InstalledRule:
    """A rule in force: its id, counters, and the commands it holds hung."""

    id: int
    rule: FaultRule
    matched: int = 0  # commands that matched its filters
    hits: int = 0  # commands its action was applied to
    hung: int = 0  # commands hung by it right now
    released: trio.Event = field(default_factory=trio.Event)

    @property
    def spent(self) -> bool:
        return self.rule.count is not None and self.hits >= self.rule.count

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, **self.rule.as_dict(), "matched": self.matched, "hits": self.hits,
                "hung": self.hung, "spent": self.spent}


def _lba_range(cdb: bytes) -> tuple[int, int, int] | None:
    """(LBA, number of blocks, offset of the length field) of a READ/WRITE/WRITE AND
    VERIFY CDB (already checked for its length by check_cdb)."""
    try:
        return rw_fields(cdb)
    except (IndexError, ValueError, struct.error):
        return None


class FaultInjector:
    """The fault rules of one Target, in id order."""

    def __init__(self, target: Target) -> None:
        self._target = target
        self._rules: dict[int, InstalledRule] = {}
        self._ids = itertools.count(1)

    # -- the rule list ----------------------------------------------------------------

    def add(self, rule: FaultRule) -> InstalledRule:
        rule.validate()
        self._target.logical_unit(rule.lu)  # KeyError: no such LU
        installed = InstalledRule(next(self._ids), rule)
        self._rules[installed.id] = installed
        self._target.faults = self
        log.warning("fault rule %d added: %s", installed.id, rule.as_dict())
        return installed

    def remove(self, rule_id: int) -> InstalledRule:
        """Remove one rule (KeyError if none); commands it holds hung go on and run."""
        installed = self._rules.pop(rule_id)
        installed.released.set()
        if not self._rules:
            self._target.faults = None
        log.warning("fault rule %d removed (%d hits)", rule_id, installed.hits)
        return installed

    def clear(self) -> list[InstalledRule]:
        removed = [self.remove(i) for i in list(self._rules)]
        return removed

    def rules(self) -> list[InstalledRule]:
        return list(self._rules.values())

    def get(self, rule_id: int) -> InstalledRule:
        return self._rules[rule_id]

    def forget_lu(self, lu_name: str) -> None:
        """An LU went away: its rules go with it."""
        for i, r in list(self._rules.items()):
            if r.rule.lu == lu_name:
                self.remove(i)

    # -- the submit path (Target._run, only while rules exist) ------------------------

    def intercept(self, cmd: Command, info: CommandInfo, lu: LogicalUnit
                  ) -> ScsiResponse | Coroutine[Any, Any, ScsiResponse] | None:
        """The command's fate when a rule hits it (as Target._run returns it), else None."""
        op = cmd.cdb[0]
        op_class = "read" if op in READ_OPCODES else "write" if op in WRITE_OPCODES else "other"
        span: tuple[int, int, int] | None = None
        if op_class != "other":
            span = _lba_range(cmd.cdb)
        for installed in self._rules.values():
            rule = installed.rule
            if rule.lu != lu.name or installed.spent:
                continue
            if rule.initiator is not None and rule.initiator != cmd.initiator:
                continue
            if rule.op is not None and rule.op != op_class:
                continue
            first_bad = None
            if rule.lba_first is not None:
                assert rule.lba_last is not None
                if span is None or span[1] == 0:
                    continue
                lba, nblocks, _ = span
                if lba > rule.lba_last or lba + nblocks - 1 < rule.lba_first:
                    continue
                first_bad = max(lba, rule.lba_first)
            elif span is not None and span[1]:
                first_bad = span[0]
            installed.matched += 1
            if rule.every is not None and installed.matched % rule.every:
                continue
            installed.hits += 1
            log.info("fault rule %d hits %s tag %#x on %s (%s)", installed.id, cmd.initiator,
                     cmd.req.tag, lu.name, rule.action.value)
            handler = self._handler(installed, info, lu, span, first_bad)
            return self._target.run_as_task(cmd, replace(info, handler=handler), lu)
        return None

    def _handler(self, installed: InstalledRule, info: CommandInfo, lu: LogicalUnit,
                 span: tuple[int, int, int] | None, first_bad: int | None):
        rule = installed.rule
        action = rule.action

        if action is FaultAction.DELAY:
            assert rule.delay_ms is not None
            delay = rule.delay_ms / 1000

            async def delayed(cmd: Command) -> int | None:
                await trio.sleep(delay)  # an abort lands here: nothing done yet
                return await info.handler(cmd)
            return delayed

        if action is FaultAction.HANG:
            async def hung(cmd: Command) -> int | None:
                if rule.abort_fails:
                    task = lu.tasks.find(cmd.initiator, cmd.lun, cmd.req.tag)
                    if task is not None:
                        task.refuses_abort_task = True
                installed.hung += 1
                try:
                    await installed.released.wait()  # until aborted, reset, or the rule goes
                finally:
                    installed.hung -= 1
                task = lu.tasks.find(cmd.initiator, cmd.lun, cmd.req.tag)
                if task is not None:
                    task.refuses_abort_task = False
                return await info.handler(cmd)
            return hung

        if action in _STATUS:
            status = _STATUS[action]

            async def status_only(cmd: Command) -> int | None:
                return status
            return status_only

        key, asc, ascq = rule.sense()

        async def check_condition(cmd: Command) -> int | None:
            information = None
            if span is not None:
                check_range(cmd, *span)  # an LBA beyond the medium stays ILLEGAL REQUEST
            if key in _LBA_SENSE_KEYS and first_bad is not None and span is not None:
                information = first_bad
                good = first_bad - span[0]
                if good:
                    await _transfer_good_blocks(cmd, lu, span[0], good)
            raise SenseError(SenseKey(key), asc, ascq, information=information)
        return check_condition


async def _transfer_good_blocks(cmd: Command, lu: LogicalUnit, lba: int, nblocks: int) -> None:
    """The blocks before the failing one, read into or written from the command's buffer."""
    nbytes = nblocks * lu.block_size
    offset = lba * lu.block_size
    if cmd.in_len:
        await lu.backing.read_into(offset, cmd.in_views(nbytes))
    elif cmd.out_len and not lu.read_only:
        views = cmd.out_views(nbytes)
        async with lu.write_gate.shared():
            await lu.backing.write_from(offset, views, sync=not lu.mode.wce)
