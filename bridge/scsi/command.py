"""The command being executed, and the one dispatch table keyed by (opcode, service action).

Every handler module (a command family) collects its rows in a ``CommandRows``; the
table is built from the families listed in command_families.py. A row's metadata (CDB
length, CDB usage data) drives both the reserved-bit checks before dispatch and
REPORT SUPPORTED OPERATION CODES (SPC-4 6.35).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bridge.scsi.request import ScsiRequest

from .buffers import gather, prefix, scatter
from .cdb import SERVICE_ACTION_OPCODES, cdb_length
from .sense import FieldPointer, SenseError, SenseKey, invalid_field_in_cdb, invalid_opcode

if TYPE_CHECKING:
    from .logical_unit import LogicalUnit
    from .ports import Port
    from .target import Target


class Overrun(Exception):
    """virtio 1.2 5.6.6.1: the CDB needs more data than the data-in/out buffers hold."""


class Command:
    """One SCSI command on its way through a handler: CDB, LU, and the data buffers.

    Handlers move data only through these methods, which keep count of the bytes
    transferred so the residual can be reported.
    """

    __slots__ = ("target", "req", "cdb", "lu", "lun", "initiator", "in_done", "out_done",
                 "in_len", "out_len", "info", "port")

    def __init__(self, target: Target, req: ScsiRequest, cdb: bytes, lu: LogicalUnit | None,
                 lun: int, in_len: int, out_len: int) -> None:
        self.target = target
        self.req = req
        self.cdb = cdb
        self.lu = lu
        self.lun = lun
        self.initiator = req.initiator.name
        self.in_len = in_len
        self.out_len = out_len
        self.in_done = 0
        self.out_done = 0
        self.info: CommandInfo | None = None
        self.port: Port = target.ports.default  # the target port it came in on (ports.py)

    def send(self, data: bytes | bytearray, alloc_len: int) -> None:
        """SPC-4 4.2.5.6 allocation length: transfer min(data, allocation length, buffer)."""
        n = min(len(data), alloc_len)
        self.in_done = scatter(self.req.data_in, memoryview(data)[:n])

    def in_views(self, nbytes: int) -> list[memoryview]:
        """The data-in buffer for a transfer of exactly ``nbytes`` (OVERRUN when shorter)."""
        if self.in_len < nbytes:
            raise Overrun
        self.in_done = nbytes
        data_in = self.req.data_in
        if self.in_len == nbytes and len(data_in) == 1:
            return data_in  # the usual case: one buffer of exactly the transfer
        return prefix(data_in, nbytes)

    def out_views(self, nbytes: int) -> list[memoryview]:
        """The data-out buffer for a transfer of exactly ``nbytes`` (OVERRUN when shorter)."""
        if self.out_len < nbytes:
            raise Overrun
        self.out_done = nbytes
        return prefix(self.req.data_out, nbytes)

    def receive(self, nbytes: int) -> bytes:
        """A small parameter list of ``nbytes`` gathered into bytes (OVERRUN when shorter)."""
        if self.out_len < nbytes:
            raise Overrun
        self.out_done = nbytes
        return gather(self.req.data_out, nbytes)

    @property
    def residual(self) -> int:
        if self.in_len:
            return self.in_len - self.in_done
        if self.out_len:
            return self.out_len - self.out_done
        return 0


Handler = Callable[[Command], Awaitable[int | None]]
# A synchronous attempt to complete the command without blocking: True when done (GOOD),
# False when the async handler must run (as an abortable task). May raise SenseError.
FastPath = Callable[[Command], bool]


@dataclass(frozen=True)
class CommandInfo:
    opcode: int
    service_action: int | None
    name: str
    handler: Handler
    usage: bytes  # SPC-4 6.35.3 CDB USAGE DATA: bit set = the device server evaluates it
    allowed_with_ua: bool = False  # SAM-5 5.14: INQUIRY, REPORT LUNS, REQUEST SENSE
    allowed_without_lu: bool = False  # answered on an unmapped LUN / the W-LUN
    medium: bool = False  # needs the medium: NOT READY while stopped (SBC-3 5.25)
    fast: FastPath | None = None
    # The CDB bits outside the usage data (and outside the CONTROL byte's vendor bits) as
    # one big-endian integer: check_cdb tests a CDB with one AND.
    reserved: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.usage)
        allowed = bytearray(self.usage)
        allowed[0] = 0xFF  # the opcode itself
        allowed[n - 1] |= 0xC0
        object.__setattr__(self, "reserved", int.from_bytes(allowed, "big") ^ ((1 << 8 * n) - 1))

    @property
    def cdb_length(self) -> int:
        return len(self.usage)


CommandKey = tuple[int, int | None]  # (opcode, service action or None)


class CommandRows:
    """The rows one command family (a handler module) contributes to the dispatch table.

    A family module defines ``ROWS = CommandRows()`` and decorates its handlers with
    ``@ROWS.command(...)``; the table is built from the families that
    command_families.py declares, nothing registers itself anywhere else.
    """

    def __init__(self) -> None:
        self.rows: list[CommandInfo] = []

    def command(self, opcode: int, service_action: int | None, name: str, usage: str, *,
                allowed_with_ua: bool = False, allowed_without_lu: bool = False,
                medium: bool = False, fast: FastPath | None = None
                ) -> Callable[[Handler], Handler]:
        """Add a row; ``usage`` is the CDB usage data in hex (spaces allowed)."""
        raw = bytes.fromhex(usage)
        if raw[0] != opcode:
            raise ValueError(f"{name}: usage data must start with the opcode")
        expected = cdb_length(opcode)
        if expected is not None and len(raw) != expected:
            raise ValueError(f"{name}: usage data is {len(raw)} bytes, the CDB {expected}")
        if (service_action is not None) != (opcode in SERVICE_ACTION_OPCODES):
            raise ValueError(f"{name}: a service action goes with a service-action opcode")

        def add(fn: Handler) -> Handler:
            self.rows.append(CommandInfo(opcode, service_action, name, fn, raw,
                                         allowed_with_ua, allowed_without_lu, medium, fast))
            return fn

        return add


class CommandTable:
    """The dispatch table keyed by (opcode, service action), from a list of families."""

    def __init__(self, families: Iterable[CommandRows]) -> None:
        self._rows: dict[CommandKey, CommandInfo] = {}
        for family in families:
            for info in family.rows:
                key = (info.opcode, info.service_action)
                if key in self._rows:
                    raise ValueError(f"{info.name}: duplicate row {key}")
                self._rows[key] = info
        self._opcodes = frozenset(op for op, _sa in self._rows)
        # Rows of opcodes without a service action, indexed by opcode (the I/O hot path).
        self._plain: list[CommandInfo | None] = [self._rows.get((op, None)) for op in range(256)]

    def get(self, key: CommandKey) -> CommandInfo | None:
        return self._rows.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self) -> list[CommandInfo]:
        """Every row, in opcode and service action order (as RSOC reports them)."""
        return sorted(self._rows.values(), key=lambda i: (i.opcode, i.service_action or 0))

    def lookup(self, cdb: bytes) -> CommandInfo:
        """The row for a CDB, or the SPC-4 error for an unknown opcode/service action."""
        if not cdb:
            raise invalid_opcode()
        info = self._plain[cdb[0]]
        if info is not None:
            return info
        op = cdb[0]
        if op in SERVICE_ACTION_OPCODES:
            if len(cdb) < 2:
                raise invalid_opcode()
            info = self._rows.get((op, cdb[1] & 0x1F))
            if info is None:
                if op not in self._opcodes:
                    raise invalid_opcode()
                raise invalid_field_in_cdb(1, 4)
            return info
        info = self._rows.get((op, None))
        if info is None:
            raise invalid_opcode()
        return info


def check_cdb(info: CommandInfo, cdb: bytes) -> bytes:
    """CDB length and every bit outside the usage data must be zero (SPC-4 4.2.1).

    Returns the CDB trimmed to its length. The CONTROL byte's vendor-specific bits
    7-6 are ignored.
    """
    usage = info.usage
    n = len(usage)
    if len(cdb) != n or type(cdb) is not bytes:
        if len(cdb) < n:
            # Shorter than its own opcode's CDB: nothing sensible to point at but its end.
            raise SenseError(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00,
                             FieldPointer(len(cdb), None, True))
        cdb = bytes(cdb[:n])
    if not int.from_bytes(cdb, "big") & info.reserved:
        return cdb
    # A reserved bit is set: find the first one, byte by byte, for the sense data.
    for i in range(1, n):
        allowed = usage[i] | (0xC0 if i == n - 1 else 0)
        bad = cdb[i] & ~allowed
        if bad:
            raise invalid_field_in_cdb(i, bad.bit_length() - 1)
    return cdb
