"""Task management functions (SAM-5 7) as a table keyed by function.

Each row is the handler and the bit that REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS
(SPC-4 6.38) sets for it, so the two cannot disagree: a function with no row is
answered FUNCTION REJECTED and reported as unsupported. CLEAR ACA has no row: NACA=1
is refused (bridge/scsi/command.py), so there is never an ACA condition to clear.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .request import TaskManagementFunction as F
from .request import TmfRequest
from .request import TmfServiceResponse as R
from .task_set import TaskSet
from .unit_attention import COMMANDS_CLEARED_BY_ANOTHER_INITIATOR

if TYPE_CHECKING:
    from .logical_unit import LogicalUnit
    from .target import Target

Handler = Callable[["Target", TmfRequest, "LogicalUnit"], Awaitable[R]]


@dataclass(frozen=True)
class TmfInfo:
    handler: Handler | None  # None: handled without a logical unit (I_T NEXUS RESET)
    support_byte: int  # SPC-4 6.38 parameter data: byte and bit of the ...S flag
    support_bit: int


async def _abort_task(target: Target, tmf: TmfRequest, lu: LogicalUnit) -> R:
    t = lu.tasks.find(tmf.initiator.name, tmf.lun, tmf.tag)
    if t is not None:
        if t.refuses_abort_task:
            return R.FUNCTION_REJECTED  # an injected fault: the task ignores ABORT TASK
        await TaskSet.abort([t])
    return R.FUNCTION_COMPLETE


async def _abort_task_set(target: Target, tmf: TmfRequest, lu: LogicalUnit) -> R:
    await TaskSet.abort(lu.tasks.matching(tmf.initiator.name, tmf.lun))
    return R.FUNCTION_COMPLETE


async def _clear_task_set(target: Target, tmf: TmfRequest, lu: LogicalUnit) -> R:
    tasks = lu.tasks.matching()
    await TaskSet.abort(tasks)
    # SAM-5 7.4 (TAS=0): other initiators learn through COMMANDS CLEARED BY ANOTHER
    # INITIATOR.
    for other in {t.initiator for t in tasks} - {tmf.initiator.name}:
        target.unit_attentions.establish(other, lu.name, COMMANDS_CLEARED_BY_ANOTHER_INITIATOR)
    return R.FUNCTION_COMPLETE


async def _logical_unit_reset(target: Target, tmf: TmfRequest, lu: LogicalUnit) -> R:
    await target.logical_unit_reset(lu)
    return R.FUNCTION_COMPLETE


async def _query_task(target: Target, tmf: TmfRequest, lu: LogicalUnit) -> R:
    found = lu.tasks.find(tmf.initiator.name, tmf.lun, tmf.tag) is not None
    return R.FUNCTION_SUCCEEDED if found else R.FUNCTION_COMPLETE


async def _query_task_set(target: Target, tmf: TmfRequest, lu: LogicalUnit) -> R:
    found = bool(lu.tasks.matching(tmf.initiator.name, tmf.lun))
    return R.FUNCTION_SUCCEEDED if found else R.FUNCTION_COMPLETE


# SPC-4 6.38 byte 0: ATS ATSS CACAS CTSS LURS QTS TRS WAKES; byte 1: QUAS QTSS ITNRS.
TASK_MANAGEMENT_FUNCTIONS: dict[F, TmfInfo] = {
    F.ABORT_TASK: TmfInfo(_abort_task, 0, 0x80),
    F.ABORT_TASK_SET: TmfInfo(_abort_task_set, 0, 0x40),
    F.CLEAR_TASK_SET: TmfInfo(_clear_task_set, 0, 0x10),
    F.LOGICAL_UNIT_RESET: TmfInfo(_logical_unit_reset, 0, 0x08),
    F.QUERY_TASK: TmfInfo(_query_task, 0, 0x04),
    F.QUERY_TASK_SET: TmfInfo(_query_task_set, 1, 0x02),
    F.I_T_NEXUS_RESET: TmfInfo(None, 1, 0x01),
}


def supported_tmf_flags() -> bytes:
    """Bytes 0-1 of the REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS parameter data."""
    flags = bytearray(2)
    for info in TASK_MANAGEMENT_FUNCTIONS.values():
        flags[info.support_byte] |= info.support_bit
    return bytes(flags)
