"""Command statistics per (initiator port, logical unit): the control plane's ``stats``.

The target calls ``Statistics.record`` once per completed command (Target.submit and
its coroutine), so the cost on the READ/WRITE hot path is two ``perf_counter_ns`` calls,
two dict lookups and a few integer adds into a preallocated list: no object is created
for a GOOD command. Everything else (errors by sense key, snapshots, sums per LU and
per initiator) happens off the hot path.

Counters of one (initiator, LU) pair are one list; ``_by_nexus[initiator][lun]`` caches
it, and a LUN mapped or unmapped (a target event) drops the cached entry so the next
command finds the LU now behind that LUN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .events import LunAdded, LunRemoved, TargetEvent
from .request import (
    ScsiRequest,
    ScsiResponse,
    ScsiStatus,
    ServiceResponse,
    TmfRequest,
    TmfServiceResponse,
)

if TYPE_CHECKING:
    from .target import Target

KIND_NAMES = ("other", "read", "write")
# Opcodes counted as reads and writes (SBC-3): READ 6/10/12/16; WRITE 6/10/12/16,
# WRITE AND VERIFY 10/12/16. Everything else is "other".
_KIND = bytearray(256)
for _op in (0x08, 0x28, 0xA8, 0x88):
    _KIND[_op] = 1
for _op in (0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E):
    _KIND[_op] = 2

# Latency histogram: bucket 0 counts commands under 1 us, bucket i (1..) those in
# [2**(i-1), 2**i) us, the last one everything from 2**(N-2) us (~4.3 s for N = 24).
HISTOGRAM_BUCKETS = 24
_LAST = HISTOGRAM_BUCKETS - 1
# List layout: commands by kind (0-2), bytes read, bytes written, errors, histogram.
_BYTES_READ = 3
_BYTES_WRITTEN = 4
_ERRORS = 5
_HIST = 6
_SIZE = _HIST + HISTOGRAM_BUCKETS
_HIST_LAST = _HIST + _LAST
_LAST_US = 1 << (_LAST - 1)
_COMPLETE = ServiceResponse.COMMAND_COMPLETE

_SENSE_KEY_NAMES = (
    "NO SENSE", "RECOVERED ERROR", "NOT READY", "MEDIUM ERROR", "HARDWARE ERROR",
    "ILLEGAL REQUEST", "UNIT ATTENTION", "DATA PROTECT", "BLANK CHECK", "VENDOR SPECIFIC",
    "COPY ABORTED", "ABORTED COMMAND", "RESERVED (Ch)", "VOLUME OVERFLOW", "MISCOMPARE",
    "COMPLETED",
)


def histogram_bucket_bounds() -> list[tuple[int, int | None]]:
    """[lower, upper) microseconds of each bucket; the last has no upper bound."""
    bounds: list[tuple[int, int | None]] = [(0, 1)]
    for i in range(1, HISTOGRAM_BUCKETS):
        bounds.append((1 << (i - 1), 1 << i if i < _LAST else None))
    return bounds


def _sense_key(sense: bytes) -> int | None:
    """The sense key of fixed (70h/71h) or descriptor (72h/73h) format sense data."""
    if len(sense) < 3:
        return None
    code = sense[0] & 0x7F
    if code in (0x70, 0x71):
        return sense[2] & 0x0F
    if code in (0x72, 0x73):
        return sense[1] & 0x0F
    return None


class _Pair:
    """The counters of one (initiator, LU) pair and its error breakdown."""

    __slots__ = ("initiator", "lu", "counts", "errors")

    def __init__(self, initiator: str, lu: str | None) -> None:
        self.initiator = initiator
        self.lu = lu
        self.counts = [0] * _SIZE
        self.errors: dict[str, int] = {}


class Statistics:
    """Counts commands of one Target since creation or the last ``reset``."""

    def __init__(self, target: Target) -> None:
        self._target = target
        self._pairs: dict[tuple[str, str | None], _Pair] = {}
        self._by_nexus: dict[str, dict[int, list[int]]] = {}
        self._pair_of: dict[int, _Pair] = {}  # id(counts) -> pair, for errors
        # Task management functions: (initiator, LU or None, function, response) -> count.
        self._tmfs: dict[tuple[str, str | None, str, str], int] = {}
        target.subscribe(self._on_event)

    def _on_event(self, event: TargetEvent) -> None:
        if isinstance(event, LunAdded | LunRemoved):
            self._by_nexus.get(event.initiator, {}).pop(event.lun, None)

    def _counts(self, initiator: str, lun: int) -> list[int]:
        lu = self._target.lun_maps().get(initiator, {}).get(lun)
        pair = self._pairs.get((initiator, lu))
        if pair is None:
            pair = self._pairs[(initiator, lu)] = _Pair(initiator, lu)
            self._pair_of[id(pair.counts)] = pair
        self._by_nexus.setdefault(initiator, {})[lun] = pair.counts
        return pair.counts

    def record(self, req: ScsiRequest, resp: ScsiResponse, ns: int) -> None:
        """One completed command that took ``ns`` nanoseconds inside the target."""
        try:
            c = self._by_nexus[req.initiator.name][req.lun]
        except KeyError:
            c = self._counts(req.initiator.name, req.lun)
        us = ns // 1000
        c[_HIST + us.bit_length() if us < _LAST_US else _HIST_LAST] += 1
        cdb = req.cdb
        kind = _KIND[cdb[0]] if cdb else 0
        c[kind] += 1
        if resp.status or resp.response is not _COMPLETE:
            self._error(c, resp)
        elif kind:  # bytes read (kind 1) or written (kind 2), in the list after the kinds
            d = req.data_in if kind == 1 else req.data_out
            c[kind + 2] += (len(d[0]) if len(d) == 1 else sum(map(len, d))) - resp.residual

    def _error(self, c: list[int], resp: ScsiResponse) -> None:
        c[_ERRORS] += 1
        pair = self._pair_of[id(c)]
        if resp.response is not ServiceResponse.COMMAND_COMPLETE:
            what = resp.response.name
        elif resp.status == ScsiStatus.CHECK_CONDITION:
            key = _sense_key(resp.sense)
            what = _SENSE_KEY_NAMES[key] if key is not None else "CHECK CONDITION"
        else:
            try:
                what = ScsiStatus(resp.status).name
            except ValueError:
                what = f"status {resp.status:#x}"
        pair.errors[what] = pair.errors.get(what, 0) + 1

    def record_tmf(self, tmf: TmfRequest, response: TmfServiceResponse) -> None:
        """One task management function and its service response (SAM-5 7)."""
        lu = self._target.lun_maps().get(tmf.initiator.name, {}).get(tmf.lun)
        key = (tmf.initiator.name, lu, tmf.function.name, response.name)
        self._tmfs[key] = self._tmfs.get(key, 0) + 1

    def reset(self) -> None:
        self._tmfs.clear()
        for pair in self._pairs.values():
            pair.counts[:] = [0] * _SIZE
            pair.errors.clear()

    def snapshot(self) -> dict:
        """{"logical_units": {name: counters}, "initiators": {name: counters}}; counters
        of commands to unmapped LUNs appear under their initiator only."""
        by_lu: dict[str, _Sum] = {}
        by_ini: dict[str, _Sum] = {}
        for pair in self._pairs.values():
            if pair.lu is not None:
                by_lu.setdefault(pair.lu, _Sum()).add(pair)
            by_ini.setdefault(pair.initiator, _Sum()).add(pair)
        tmf_lu: dict[str, dict[str, dict[str, int]]] = {}
        tmf_ini: dict[str, dict[str, dict[str, int]]] = {}
        for (ini, lu, function, response), n in sorted(self._tmfs.items(), key=str):
            for table, name in ((tmf_ini, ini), (tmf_lu, lu)):
                if name is not None:
                    row = table.setdefault(name, {}).setdefault(function, {})
                    row[response] = row.get(response, 0) + n
        lus = {k: v.as_dict() for k, v in sorted(by_lu.items())}
        inis = {k: v.as_dict() for k, v in sorted(by_ini.items())}
        for table, section in ((tmf_lu, lus), (tmf_ini, inis)):
            for name, row in table.items():
                section.setdefault(name, _Sum().as_dict())["task_management"] = row
        for section in (lus, inis):
            for counters in section.values():
                counters.setdefault("task_management", {})
        return {
            "logical_units": lus,
            "initiators": inis,
            "histogram_bounds_us": histogram_bucket_bounds(),
        }


class _Sum:
    def __init__(self) -> None:
        self.counts = [0] * _SIZE
        self.errors: dict[str, int] = {}

    def add(self, pair: _Pair) -> None:
        self.counts = [a + b for a, b in zip(self.counts, pair.counts, strict=True)]
        for k, v in pair.errors.items():
            self.errors[k] = self.errors.get(k, 0) + v

    def as_dict(self) -> dict:
        c = self.counts
        return {
            "commands": {name: c[i] for i, name in enumerate(KIND_NAMES)},
            "bytes_read": c[_BYTES_READ],
            "bytes_written": c[_BYTES_WRITTEN],
            "errors": c[_ERRORS],
            "errors_by_kind": dict(sorted(self.errors.items())),
            "latency_histogram": c[_HIST:],
        }
