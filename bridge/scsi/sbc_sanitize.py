"""SANITIZE (SBC-3 5.21, 4.11): OVERWRITE, BLOCK ERASE, EXIT FAILURE MODE.

What each means on an image file or block device:
- OVERWRITE writes the initialization pattern over every logical block, OVERWRITE
  COUNT times (INVERT: every other pass inverted), synced to stable storage.
- BLOCK ERASE deallocates every block (fallocate PUNCH_HOLE, the UNMAP path): the
  data are gone from the image and read back as zeros (LBPRZ=1, so WABEREQ 01b in the
  Block Device Characteristics page).
- CRYPTOGRAPHIC ERASE is not offered: an image holds no media encryption key to
  change, and calling an overwrite or a punch "cryptographic" would mislead.

Runs as the command's task; with IMMED=1 the command returns GOOD at once and the
operation goes on in a trio system task. Meanwhile the LU answers medium access with
NOT READY, SANITIZE IN PROGRESS and a progress indication (sanitize_state.py), also
to REQUEST SENSE and TEST UNIT READY.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from .cdb import u16
from .command import Command, CommandRows
from .logical_unit import LogicalUnit
from .sbc import check_writable
from .sense import SenseError, SenseKey, invalid_field_in_cdb, invalid_field_in_parameter_list

ROWS = CommandRows()
log = logging.getLogger(__name__)

OVERWRITE, BLOCK_ERASE, EXIT_FAILURE_MODE = 0x01, 0x02, 0x1F
OVERWRITE_PIECE_BYTES = 1 << 20
PUNCH_PIECE_BYTES = 64 << 20


def command_sequence_error() -> SenseError:
    return SenseError(SenseKey.ILLEGAL_REQUEST, 0x2C, 0x00)


def start_checks(cmd: Command) -> tuple[LogicalUnit, bool]:
    """(LU, IMMED) after the checks every sanitize operation shares."""
    lu = cmd.lu
    assert lu is not None
    if lu.sanitize.running:
        raise SenseError(lu.sanitize.progress_sense().key, 0x04, 0x1B)
    check_writable(lu)
    return lu, bool(cmd.cdb[1] & 0x80)


async def run_operation(cmd: Command, lu: LogicalUnit, immed: bool,
                        work: Callable[[LogicalUnit], Awaitable[None]]) -> None:
    state = lu.sanitize
    state.running, state.failed, state.done, state.total = True, False, 0, 1
    state.ause = bool(cmd.cdb[1] & 0x20)

    async def operation() -> None:
        try:
            await work(lu)
        except (OSError, SenseError) as e:
            log.error("LU %s: sanitize failed: %s", lu.name, e)
            state.failed = True
            if not immed:
                raise SenseError(SenseKey.MEDIUM_ERROR, 0x31, 0x03) from None
        finally:
            state.running = False

    if not immed:
        await operation()
        return

    async def background() -> None:
        try:
            await operation()
        except trio.Cancelled:
            # The run is ending (the bridge stops): an interrupted sanitize is a failed one.
            state.failed, state.running = True, False
            raise
        except Exception:  # any other exception from a system task would crash the run
            log.exception("LU %s: sanitize ended abnormally", lu.name)
            state.failed, state.running = True, False

    trio.lowlevel.spawn_system_task(background, name=f"sanitize {lu.name}")


def no_parameter_list(cmd: Command) -> None:
    if u16(cmd.cdb, 7):
        raise invalid_field_in_cdb(7)


@ROWS.command(0x48, OVERWRITE, "SANITIZE(OVERWRITE)", "48 a1 00 00 00 00 00 ff ff 00")
async def sanitize_overwrite(cmd: Command) -> None:
    """SBC-3 5.21.3 parameter list: byte 0 INVERT (7), TEST (6-5), OVERWRITE COUNT
    (4-0); bytes 2-3 INITIALIZATION PATTERN LENGTH (1 .. block size); the pattern."""
    lu, immed = start_checks(cmd)
    plen = u16(cmd.cdb, 7)
    if plen < 5 or plen > lu.block_size + 4:
        raise invalid_field_in_cdb(7)
    data = cmd.receive(plen)
    invert, test, count = bool(data[0] & 0x80), (data[0] >> 5) & 0x3, data[0] & 0x1F
    if test:
        raise invalid_field_in_parameter_list(0, 6)
    if count == 0:
        raise invalid_field_in_parameter_list(0, 4)
    if data[1]:
        raise invalid_field_in_parameter_list(1)
    pattern_len = u16(data, 2)
    if pattern_len == 0 or pattern_len > lu.block_size or pattern_len > plen - 4:
        raise invalid_field_in_parameter_list(2)
    pattern = data[4 : 4 + pattern_len]
    # The pattern repeated over a block (SBC-3: it fills each logical block).
    block = (pattern * (lu.block_size // pattern_len + 1))[: lu.block_size]
    piece = block * max(1, OVERWRITE_PIECE_BYTES // lu.block_size)
    inverse = bytes(b ^ 0xFF for b in piece)

    async def work(lu: LogicalUnit) -> None:
        size = lu.num_blocks * lu.block_size
        lu.sanitize.total = count * size
        for n in range(count):
            data = inverse if invert and n % 2 else piece
            pos = 0
            while pos < size:
                k = min(len(data), size - pos)
                async with lu.write_gate.shared():
                    await lu.backing.write_from(pos, [memoryview(data)[:k]], sync=False)
                pos += k
                lu.sanitize.done = n * size + pos
            await lu.backing.flush()

    await run_operation(cmd, lu, immed, work)


@ROWS.command(0x48, BLOCK_ERASE, "SANITIZE(BLOCK ERASE)", "48 a2 00 00 00 00 00 ff ff 00")
async def sanitize_block_erase(cmd: Command) -> None:
    """SBC-3 5.21.2: no parameter list. Deallocates every block, in pieces (progress)."""
    no_parameter_list(cmd)
    lu, immed = start_checks(cmd)

    async def work(lu: LogicalUnit) -> None:
        size = lu.num_blocks * lu.block_size
        lu.sanitize.total = size
        pos = 0
        while pos < size:
            k = min(PUNCH_PIECE_BYTES, size - pos)
            async with lu.write_gate.shared():
                await lu.backing.punch_hole(pos, k)
            pos += k
            lu.sanitize.done = pos
        await lu.backing.flush()

    await run_operation(cmd, lu, immed, work)


@ROWS.command(0x48, EXIT_FAILURE_MODE, "SANITIZE(EXIT FAILURE MODE)", "48 bf 00 00 00 00 00 ff ff 00")
async def sanitize_exit_failure_mode(cmd: Command) -> None:
    """SBC-3 5.21.4: leave sanitize failure mode, if the failed operation allowed it
    (AUSE=1); no parameter list."""
    no_parameter_list(cmd)
    lu = cmd.lu
    assert lu is not None
    state = lu.sanitize
    if state.running:
        raise SenseError(SenseKey.NOT_READY, 0x04, 0x1B)
    if not state.failed:
        raise command_sequence_error()
    if not state.ause:
        raise invalid_field_in_cdb(1, 4)
    state.failed = False
