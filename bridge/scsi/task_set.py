"""The task set of a logical unit (SAM-5 4.6.5, 7): every command in flight, abortable.

Each task runs inside its own trio CancelScope. Aborting cancels the scope and
waits until the command has completed (with ABORTED), so that the TMF response
comes after the aborted command's response (SAM-5 7.2, virtio 1.2 5.6.6.2).
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


class TaskSet:
    def __init__(self) -> None:
        self._tasks: dict[tuple[str, int, int], Task] = {}

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
