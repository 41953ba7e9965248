"""Crash loop through the whole target core: kill -9 the bridge process, restart, compare.

A child process builds a real ``Target`` on one image (its APTPL file is
``<image>.pr.json``) and sends PERSISTENT RESERVE OUT commands from three
initiators through ``Target.execute`` (the same path a guest's request takes):
REGISTER / REGISTER AND IGNORE EXISTING KEY (always with APTPL), RESERVE of
every type, RELEASE, PREEMPT, PREEMPT AND ABORT, CLEAR. It prints each
command's SCSI status and the LU's reservation status after the command
returned (= acknowledged). The parent kills it with SIGKILL at a random moment,
starts a new child on the SAME image, and checks that the state the new bridge
loaded equals the last acknowledged one, or the one after it (written to disk,
killed before the acknowledgement) - never anything else, never a refused file
(SPC-4 5.13.5). Then the workload continues from there, for several rounds.

The parent checks every acknowledged step against an in-memory model
(PersistentReservations without a state file, fed the same commands): same
SCSI status, same registrations, reservation and generation (which a restart, a power
on, sets back to zero: SPC-4 6.15.2).
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from bridge.scsi.request import (
    InitiatorPort,
)
from bridge.scsi.reservations import PersistentReservations, ReservationConflict, pr_out_cdb
from bridge.scsi.sense import SenseError

REPO = Path(__file__).resolve().parents[3]
INITIATORS = [f"iqn.2026-11.org.vscsi-bridge:crash-{n}" for n in "abc"]
GOOD, CHECK_CONDITION, RESERVATION_CONFLICT = 0x00, 0x02, 0x18
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT, REGISTER_IGNORE = range(7)
TYPES = (1, 3, 5, 6, 7, 8)
STEPS_PER_ROUND = 4000  # more than a round can run before it is killed
ROUNDS = 8
START_TIMEOUT = 60  # seconds for a child to load its state (slow under load)


def workload(seed: int, n: int) -> list[tuple[int, int, int]]:
    """(initiator index, service action, reservation type) triples."""
    rnd = random.Random(seed)
    weighted = [REGISTER_IGNORE] * 3 + [REGISTER] * 2 + [RESERVE] * 3 + [RELEASE] * 2 \
        + [PREEMPT] * 2 + [PREEMPT_AND_ABORT] * 2 + [CLEAR]
    return [(rnd.randrange(3), rnd.choice(weighted), rnd.choice(TYPES)) for _ in range(n)]


def parameters(status: dict[str, Any], step: tuple[int, int, int], salt: int) -> tuple[int, bytes, bool]:
    """The CDB type and the 24-byte parameter list for ``step`` given the current status.

    Keys are taken from the status, so that most commands do something; the
    third value says whether APTPL is set (register actions only, SPC-4 6.16.3).
    """
    who, sa, rtype = step
    keys = {r["initiator"]: int(r["key"], 16) for r in status["registrants"]}
    mine = keys.get(INITIATORS[who], 0)
    others = [k for name, k in keys.items() if name != INITIATORS[who]]
    rkey = sakey = 0
    if sa == REGISTER_IGNORE:
        sakey = 0x1000 * (who + 1) + salt % 0xFFF + 1
    elif sa == REGISTER:
        rkey = mine
        sakey = 0 if salt % 4 == 0 else 0x1000 * (who + 1) + salt % 0xFFF + 1  # 1 in 4 unregisters
    elif sa in (RESERVE, RELEASE):
        rkey = mine
        if sa == RELEASE and status["type"] is not None:
            rtype = {"WE": 1, "EA": 3, "WERO": 5, "EARO": 6, "WEAR": 7, "EAAR": 8}[status["type"]]
    elif sa == CLEAR:
        rkey = mine
    else:  # PREEMPT (AND ABORT): someone else's key, or the holder's
        rkey = mine
        sakey = others[salt % len(others)] if others else 0x999
    aptpl = sa in (REGISTER, REGISTER_IGNORE)
    if sa in (REGISTER, REGISTER_IGNORE, CLEAR):
        rtype = 0
    data = struct.pack(">QQIBBH", rkey, sakey, 0, 0x01 if aptpl else 0, 0, 0)
    return rtype, data, aptpl


# --------------------------------------------------------------------------- child


async def _child_main(image: str, seed: int, start: int) -> None:
    from bridge.scsi.logical_unit import LogicalUnitSpec
    from bridge.scsi.request import (
        ScsiRequest,
    )
    from bridge.scsi.target import Target

    target = Target([LogicalUnitSpec(name="lu0", path=image, size=1 << 20)],
                    {name: {0: "lu0"} for name in INITIATORS})
    lu = target.logical_unit("lu0")
    tag = 0

    async def execute(name: str, cdb: bytes, data: bytes = b"") -> int:
        nonlocal tag
        for _ in range(8):  # an initiator retries after a unit attention (SAM-5 5.14)
            tag += 1
            req = ScsiRequest(lun=0, tag=tag, cdb=cdb, initiator=InitiatorPort(name),
                              data_out=[memoryview(data)] if data else [])
            resp = await target.execute(req)
            sense = resp.sense
            key = (sense[1] if sense[0] & 0x7F in (0x72, 0x73) else sense[2]) & 0x0F if len(sense) > 2 else 0
            if not (resp.status == CHECK_CONDITION and key == 0x06):
                return int(resp.status)
        raise AssertionError("unit attentions never cleared")

    for name in INITIATORS:  # consume the power-on unit attention
        await execute(name, bytes(6))
    print("READY " + json.dumps(lu.reservations.status()), flush=True)
    for i, step in enumerate(workload(seed, STEPS_PER_ROUND)):
        rtype, data, _ = parameters(lu.reservations.status(), step, start + i)
        status = await execute(INITIATORS[step[0]], pr_out_cdb(step[1], rtype, len(data)), data)
        print(f"ACK {i} {status} " + json.dumps(lu.reservations.status()), flush=True)
    target.close()


def child() -> None:
    image, seed, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    trio.run(_child_main, image, seed, start)


# --------------------------------------------------------------------------- model


def _comparable(status: dict[str, Any]) -> dict[str, Any]:
    """The status without APTPL (the model has no file) and without the SPC-2 holder."""
    return {k: v for k, v in status.items() if k not in ("aptpl", "spc2_holder", "lu")}


class Model:
    """PersistentReservations in memory, fed the commands the child acknowledged."""

    def __init__(self) -> None:
        self.pr = PersistentReservations("lu0", None, lambda *a: None)

    def status(self) -> dict[str, Any]:
        return _comparable(self.pr.status())

    def apply(self, step: tuple[int, int, int], salt: int) -> int:
        rtype, data, aptpl = parameters(self.pr.status(), step, salt)
        if aptpl:  # no state file in the model: APTPL off, else identical
            data = data[:20] + b"\0" + data[21:]
        try:
            trio.run(self.pr.handle, InitiatorPort(INITIATORS[step[0]]),
                     pr_out_cdb(step[1], rtype, len(data)), data, 0)
        except ReservationConflict:
            return RESERVATION_CONFLICT
        except SenseError:
            return CHECK_CONDITION
        return GOOD

    def replayed(self, steps: list[tuple[tuple[int, int, int], int]]) -> Model:
        m = Model()
        for step, salt in steps:
            m.apply(step, salt)
        return m


def _start(image: Path, seed: int, start: int) -> subprocess.Popen[bytes]:
    code = "from tests.unit.scsi.test_pr_crash import child; child()"
    return subprocess.Popen([sys.executable, "-c", code, str(image), str(seed), str(start)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            bufsize=0)  # unbuffered: readline() must not take ACK lines from communicate()


def _line(proc: subprocess.Popen[bytes]) -> str:
    """One line of the child's output, waiting at most START_TIMEOUT seconds."""
    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], START_TIMEOUT)[0]:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"the bridge printed nothing within {START_TIMEOUT} s\n{err.decode()}")
    return proc.stdout.readline().decode()


def _ready(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    line = _line(proc)
    if not line.startswith("READY "):
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"the restarted bridge did not load its state: {line!r}\n{err.decode()}")
    return json.loads(line[6:])


def test_kill_9_the_target_process_and_restart_on_the_same_image(tmp_path: Path) -> None:
    image = tmp_path / "lu0.img"
    rnd = random.Random(2026)
    applied: list[tuple[tuple[int, int, int], int]] = []  # every step the disk state includes
    model = Model()
    salt = 0
    acked_per_round: list[int] = []
    loaded_next = 0  # restarts that found the unacknowledged command's state
    proc = _start(image, 0, salt)
    loaded = _ready(proc)
    assert loaded["registrants"] == [] and loaded["holder"] is None, loaded
    for r in range(ROUNDS):
        steps = workload(r, STEPS_PER_ROUND)
        first = _line(proc)  # the first acknowledgement: the workload is under way
        time.sleep(rnd.random() * 0.3)
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=START_TIMEOUT)
        assert proc.returncode == -signal.SIGKILL, err.decode()
        acked = -1
        for line in (first + out.decode()).splitlines():
            parts = line.split(" ", 3)
            if len(parts) < 4 or parts[0] != "ACK":
                break
            try:
                i, status, st = int(parts[1]), int(parts[2]), json.loads(parts[3])
            except ValueError:
                break  # the last line, cut by the kill
            assert i == acked + 1
            # every acknowledged command did what the model does
            assert model.apply(steps[i], salt + i) == status, (r, i, steps[i])
            applied.append((steps[i], salt + i))
            assert _comparable(st) == model.status(), (r, i, steps[i])
            acked = i
        acked_per_round.append(acked)
        # restart on the same image: the last acknowledged state, or the next one
        nxt = acked + 1
        proc = _start(image, r + 1, salt + nxt + 1)
        loaded = _ready(proc)
        # SPC-4 6.15.2: the restart is a power on, PRgeneration starts again from zero;
        # registrations and reservation are the model's.
        assert loaded["generation"] == 0, loaded
        if _comparable(loaded) != {**model.status(), "generation": 0}:
            candidate = model.replayed([*applied, (steps[nxt], salt + nxt)])
            assert _comparable(loaded) == {**candidate.status(), "generation": 0}, (
                r, acked, loaded, model.status())
            applied.append((steps[nxt], salt + nxt))
            model = candidate
            loaded_next += 1
        model.pr._state.generation = 0
        # with APTPL requested by every register action, the file exists once anyone registered
        assert loaded["aptpl"] == os.path.exists(str(image) + ".pr.json")
        salt += nxt + 1
    proc.kill()
    proc.communicate()
    print("acknowledged commands per round before the kill:", acked_per_round,
          f"restarts that loaded the unacknowledged command's state: {loaded_next}")
    # the kills landed inside the workload, after real progress
    assert all(0 <= a < STEPS_PER_ROUND - 1 for a in acked_per_round), acked_per_round
    assert sum(acked_per_round) >= 10 * ROUNDS, acked_per_round
