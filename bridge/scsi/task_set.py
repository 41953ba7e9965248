"""The task set of a logical unit (SAM-5 4.6.5, 7): every command in flight, abortable.

Each task runs inside its own trio CancelScope. Aborting cancels the scope and
waits until the command has completed (with ABORTED), so that the TMF response
comes after the aborted command's response (SAM-5 7.2, virtio 1.2 5.6.6.2).

Task attributes (SAM-5 8.6, 8.7): one task set per LU for every I_T nexus (control
mode page TST 000b), so the order holds across request queues, devices and
initiators. Arrival order is the order commands reach Target.submit (one trio
thread). A SIMPLE task is enabled once every older ORDERED and HEAD OF QUEUE task has
ended; an ORDERED task once every older task has ended; a HEAD OF QUEUE task at once.
SIMPLE tasks among themselves may complete in any order (QUEUE ALGORITHM MODIFIER 1).
A command that completes without yielding (the page-cache fast path) is only taken
when its attribute lets it run at once; it then ends before any later arrival.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Task:
    initiator: str
    lun: int
    tag: int
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    aborted: bool = False
    by_reset: bool = False  # aborted by a reset (ServiceResponse.TASK_ABORTED_BY_RESET)
    # A fault rule (bridge/scsi/faults.py, hang with abort_fails) makes ABORT TASK for this
    # task answer FUNCTION REJECTED; every other way of aborting it still works.
    refuses_abort_task: bool = False


SIMPLE, ORDERED, HEAD_OF_QUEUE = 0, 1, 2  # request.TaskAttribute values


class TaskSet:
    def __init__(self) -> None:
        self._tasks: dict[tuple[str, int, int], Task] = {}
        # Arrival order of the commands that run as tasks: sequence number -> attribute
        # (dicts keep insertion order, and numbers only grow), and the ORDERED / HEAD OF
        # QUEUE ones among them.
        self._next_seq = 0
        self._order: dict[int, int] = {}
        self._barriers: dict[int, None] = {}
        self._order_changed = trio.Event()
        self._dormant = 0

    # -- task attributes (SAM-5 8.6) ------------------------------------------------

    def may_run_now(self, attr: int) -> bool:
        """Whether a command with ``attr`` arriving now is enabled at once."""
        if attr == HEAD_OF_QUEUE:
            return True
        if attr == ORDERED:
            return not self._order
        return not self._barriers

    def arrive(self, attr: int) -> int:
        """Register a command that will run as a task; its sequence number. Called when
        the command arrives (synchronously in submit), so the order is arrival order."""
        seq = self._next_seq
        self._next_seq += 1
        self._order[seq] = attr
        if attr != SIMPLE:
            self._barriers[seq] = None
        return seq

    def _enabled(self, seq: int, attr: int) -> bool:
        if attr == HEAD_OF_QUEUE:
            return True
        if attr == ORDERED:
            return next(iter(self._order)) == seq
        return not self._barriers or next(iter(self._barriers)) > seq

    async def wait_enabled(self, seq: int, attr: int) -> None:
        """Dormant until the older tasks ``attr`` waits for have ended (abortable)."""
        while not self._enabled(seq, attr):
            self._dormant += 1
            try:
                await self._order_changed.wait()
            finally:
                self._dormant -= 1

    def leave(self, seq: int) -> None:
        """The task ``seq`` ended (completed, aborted, or never ran)."""
        if self._order.pop(seq, None) is None:
            return
        self._barriers.pop(seq, None)
        if self._dormant:
            self._order_changed.set()
            self._order_changed = trio.Event()

    def ordered_pending(self) -> int:
        """Tasks registered in the arrival order and not ended (tests, statistics)."""
        return len(self._order)

    def __len__(self) -> int:
        return len(self._tasks)

    def add(self, task: Task) -> bool:
        """False when a task with this (initiator, lun, tag) is already in flight."""
        key = (task.initiator, task.lun, task.tag)
        if key in self._tasks:
            return False
        self._tasks[key] = task
        return True

    def remove(self, task: Task) -> None:
        key = (task.initiator, task.lun, task.tag)
        if self._tasks.get(key) is task:
            del self._tasks[key]
        task.done.set()

    def find(self, initiator: str, lun: int, tag: int) -> Task | None:
        return self._tasks.get((initiator, lun, tag))

    def matching(self, initiator: str | None = None, lun: int | None = None) -> list[Task]:
        return [
            t for t in self._tasks.values()
            if (initiator is None or t.initiator == initiator) and (lun is None or t.lun == lun)
        ]

    @staticmethod
    async def abort(tasks: list[Task], by_reset: bool = False) -> None:
        """Abort ``tasks`` (``by_reset``: for a reset, SAM-5 6.3) and wait until each one
        has completed."""
        for t in tasks:
            t.aborted = True
            t.by_reset = t.by_reset or by_reset
            t.scope.cancel()
            log.info("aborting task tag=%#x of %s on LUN %d", t.tag, t.initiator, t.lun)
        for t in tasks:
            await t.done.wait()
        # One more scheduling round so each aborted command's caller, woken by its
        # completion, gets to post its response before the TMF response is posted.
        await trio.lowlevel.checkpoint()
