"""APTPL: the state file round trip, its removal, refusing damaged files, crash safety."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import trio

from bridge.scsi import state_file
from bridge.scsi.reservations import ReservationStateError, ReservationType

from .test_reservations_helpers import (
    KEY_A,
    KEY_B,
    KEY_C,
    PREEMPT_AND_ABORT,
    A,
    B,
    C,
    SenseError,
    expect_sense,
    make,
)

T = ReservationType


@pytest.fixture
def state_path(tmp_path):
    return str(tmp_path / "disk0.img.pr.json")


def populated(state_path):
    h = make(state_path)
    h.register(A, KEY_A, aptpl=True)
    h.register(B, KEY_B, all_tg_pt=True, aptpl=True)
    h.register(C, KEY_C, aptpl=True)
    h.reserve(A, KEY_A, T.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    return h


def powered_on(status):
    """What a reload (a power on) shows: PRgeneration back to zero (SPC-4 6.15.2,
    "regardless of the APTPL bit value"), the rest as saved."""
    return {**status, "generation": 0}


def test_round_trip(state_path):
    h = populated(state_path)
    before = h.pr.status()
    assert before["generation"] > 0
    again = make(state_path)
    assert again.pr.status() == powered_on(before)
    assert again.pr.status()["aptpl"] is True
    assert again.keys() == (0, h.keys()[1])
    assert again.reservation() == (KEY_A, 0, T.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    write10 = bytes([0x2A] + [0] * 9)
    assert again.pr.conflicts("iqn.2026-11.org.test:stranger", write10) is True
    assert again.pr.conflicts(B.name, write10) is False


def test_every_change_is_saved_while_aptpl_is_active(state_path):
    h = populated(state_path)
    h.out(B, PREEMPT_AND_ABORT, KEY_B, KEY_A, T.EXCLUSIVE_ACCESS)
    again = make(state_path)
    assert again.reservation() == (KEY_B, 0, T.EXCLUSIVE_ACCESS)
    assert again.keys() == (0, h.keys()[1])


def test_all_registrants_round_trip(state_path):
    h = make(state_path)
    h.register(A, KEY_A, aptpl=True)
    h.reserve(A, KEY_A, T.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)
    assert make(state_path).pr.status()["holder"] == "all registrants"


def test_file_is_json_next_to_the_image(state_path):
    populated(state_path)
    with open(state_path) as f:
        data = json.load(f)
    assert data["version"] == 1
    assert data["aptpl"] is True
    assert [r["initiator"] for r in data["registrations"]] == [A.name, B.name, C.name]
    assert data["reservation"] == {"type": 5, "scope": 0, "holder": A.name}
    assert not os.path.exists(state_path + ".tmp")


def test_no_file_without_aptpl(state_path):
    h = make(state_path)
    h.register(A, KEY_A)
    h.reserve(A, KEY_A, T.WRITE_EXCLUSIVE)
    assert not os.path.exists(state_path)
    assert make(state_path).keys() == (0, [])


def test_register_without_aptpl_removes_the_file(state_path):
    h = populated(state_path)
    assert os.path.exists(state_path)
    h.out(A, 0, KEY_A, KEY_A)  # REGISTER (same key), APTPL=0
    assert not os.path.exists(state_path)
    assert h.pr.status()["aptpl"] is False
    assert make(state_path).keys() == (0, [])  # power loss forgets


def test_aptpl_is_set_only_by_register_actions(state_path):
    h = make(state_path)
    h.register(A, KEY_A)
    h.out(A, 1, KEY_A, 0, T.WRITE_EXCLUSIVE, aptpl=True)  # RESERVE with APTPL bit: ignored
    assert not os.path.exists(state_path)


@pytest.mark.parametrize(
    "content,reason",
    [
        (b"", "empty"),
        (b'{"version": 1, "generation": 3, "aptpl": tr', "JSON"),
        (b"\xff\xfe\x00garbage", "JSON"),
        (b"[]", "object"),
    ],
    ids=["empty", "truncated", "garbage", "not-object"],
)
def test_damaged_file_is_refused(state_path, content, reason):
    with open(state_path, "wb") as f:
        f.write(content)
    with pytest.raises(ReservationStateError) as e:
        make(state_path)
    assert e.value.path == state_path
    assert reason in e.value.reason
    assert os.path.exists(state_path)  # never silently dropped


def test_every_truncation_of_a_real_file_is_refused(state_path):
    populated(state_path)
    with open(state_path, "rb") as f:
        good = f.read()
    for cut in range(0, len(good) - 1, 7):
        with open(state_path, "wb") as f:
            f.write(good[:cut])
        with pytest.raises(ReservationStateError):
            make(state_path)


def _valid_json():
    return {
        "version": 1,
        "lu": "disk0",
        "generation": 4,
        "aptpl": True,
        "registrations": [
            {"initiator": A.name, "key": KEY_A, "all_tg_pt": False},
            {"initiator": B.name, "key": KEY_B, "all_tg_pt": True},
        ],
        "reservation": {"type": 1, "scope": 0, "holder": A.name},
    }


def _mutations():
    def m(fn):
        d = _valid_json()
        fn(d)
        return d

    return {
        "version": m(lambda d: d.update(version=2)),
        "generation-negative": m(lambda d: d.update(generation=-1)),
        "generation-huge": m(lambda d: d.update(generation=1 << 32)),
        "generation-bool": m(lambda d: d.update(generation=True)),
        "aptpl-false": m(lambda d: d.update(aptpl=False)),
        "key-zero": m(lambda d: d["registrations"][0].update(key=0)),
        "key-string": m(lambda d: d["registrations"][0].update(key="1")),
        "duplicate": m(lambda d: d["registrations"].append(dict(d["registrations"][0]))),
        "no-name": m(lambda d: d["registrations"][0].update(initiator="")),
        "atp-not-bool": m(lambda d: d["registrations"][0].update(all_tg_pt=1)),
        "bad-type": m(lambda d: d["reservation"].update(type=2)),
        "bad-scope": m(lambda d: d["reservation"].update(scope=1)),
        "holder-unregistered": m(lambda d: d["reservation"].update(holder=C.name)),
        "ar-with-holder": m(lambda d: d["reservation"].update(type=8)),
        "registrations-not-list": m(lambda d: d.update(registrations={})),
    }


@pytest.mark.parametrize("name", list(_mutations()))
def test_semantically_invalid_file_is_refused(state_path, name):
    with open(state_path, "w") as f:
        json.dump(_mutations()[name], f)
    with pytest.raises(ReservationStateError):
        make(state_path)


def test_valid_handwritten_file_loads(state_path):
    with open(state_path, "w") as f:
        json.dump(_valid_json(), f)
    h = make(state_path)
    assert h.keys() == (0, [KEY_A, KEY_B])  # the saved generation 4: a power on resets it
    assert h.reservation() == (KEY_A, 0, T.WRITE_EXCLUSIVE)


def test_leftover_temp_file_is_discarded(state_path):
    populated(state_path)
    with open(state_path + ".tmp", "w") as f:
        f.write("{half a wri")
    h = make(state_path)
    assert h.keys()[1] == [KEY_A, KEY_B, KEY_C]
    assert not os.path.exists(state_path + ".tmp")


def test_failed_write_fails_the_command_and_keeps_old_state(state_path, monkeypatch):
    h = populated(state_path)
    before = h.pr.status()

    def crash(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state_file.os, "replace", crash)
    with pytest.raises(SenseError) as e:
        h.out(A, 0, KEY_A, 0x7777, aptpl=True)
    expect_sense(e, 0x4, 0x44, 0x00)
    assert h.pr.status() == before
    monkeypatch.undo()
    assert make(state_path).pr.status() == powered_on(before)


# ------------------------------------------------------------ kill -9 loop


def _script(seed: int, n: int) -> list[tuple[str, int, int, int, int]]:
    """A deterministic REGISTER/RESERVE/PREEMPT workload: (initiator, sa, rkey, sakey, type)."""
    rnd = random.Random(seed)
    names = [A.name, B.name, C.name]
    keys = {A.name: KEY_A, B.name: KEY_B, C.name: KEY_C}
    out = [(nm, 0, 0, keys[nm], 0) for nm in names]  # everyone registers
    for i in range(n):
        nm = rnd.choice(names)
        op = rnd.choice(["register", "reserve", "preempt"])
        if op == "register":
            out.append((nm, 6, 0, 0x1000 + i, 0))  # REGISTER AND IGNORE EXISTING KEY
        elif op == "reserve":
            out.append((nm, 1, -1, 0, rnd.choice([1, 3, 5, 6])))
        else:
            out.append((nm, 5, -1, -2, rnd.choice([1, 5])))
    return out


_CHILD_CODE = textwrap.dedent(
    """
    import json, struct, sys
    sys.path.insert(0, sys.argv[1])
    import trio
    from bridge.scsi.reservations import PersistentReservations, pr_out_cdb, ReservationConflict
    from bridge.scsi.sense import SenseError
    from bridge.scsi.request import InitiatorPort
    path, steps = sys.argv[2], json.loads(sys.argv[3])
    pr = PersistentReservations("disk0", path, lambda *a: None)
    for i, (name, sa, rkey, sakey, rtype) in enumerate(steps):
        regs = {r["initiator"]: int(r["key"], 16) for r in pr.status()["registrants"]}
        if rkey == -1:
            rkey = regs.get(name, 0)
        if sakey == -2:
            others = [k for n, k in regs.items() if n != name]
            sakey = others[0] if others else 1
        flags = 1 if sa in (0, 6) else 0  # APTPL on every register action
        data = struct.pack(">QQIBBH", rkey, sakey, 0, flags, 0, 0)
        try:
            trio.run(pr.handle, InitiatorPort(name), pr_out_cdb(sa, rtype, 24), data, 0)
        except (ReservationConflict, SenseError):
            pass
        print(json.dumps([i, pr.status()]), flush=True)
    """
)


def _expected_statuses(steps):
    """Replay the workload in memory: the status after each step."""
    h = make(None)
    out = []
    for name, sa, rkey, sakey, rtype in steps:
        regs = {r["initiator"]: int(r["key"], 16) for r in h.pr.status()["registrants"]}
        if rkey == -1:
            rkey = regs.get(name, 0)
        if sakey == -2:
            others = [k for n, k in regs.items() if n != name]
            sakey = others[0] if others else 1
        from .test_reservations_helpers import ReservationConflict as RC

        try:
            h.out(next(p for p in (A, B, C) if p.name == name), sa, rkey, sakey, rtype)
        except (RC, SenseError):
            pass
        st = h.pr.status()
        st["aptpl"] = True
        out.append(st)
    return out


def test_kill_9_at_random_points_keeps_the_last_acknowledged_state(tmp_path):
    """Crash helper: SIGKILL a worker mid-workload; the file holds an acknowledged state.

    The worker prints each status after the command returned (acknowledged).
    After the kill the state on disk must equal the last acknowledged one, or
    the one after it (committed to disk, killed before the acknowledgement).
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    rnd = random.Random(4)
    rounds = 6
    killed_at: list[int] = []
    for r in range(rounds):
        path = str(tmp_path / f"round{r}.pr.json")
        steps = _script(r, 600)
        expected = _expected_statuses(steps)
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD_CODE, root, path, json.dumps(steps)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # Unbuffered: readline() must not pull later lines into a buffer that
            # communicate() (which reads the raw fd) would never see.
            bufsize=0,
        )
        # Wait for the first acknowledgement (start-up time varies with load),
        # then kill at a random moment inside the workload.
        assert proc.stdout is not None
        first = proc.stdout.readline()
        time.sleep(rnd.random() * 0.3)
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        lines = [ln for ln in (first + out).decode().splitlines() if ln.strip()]
        assert first, err.decode()
        acked = -1
        for ln in lines:
            try:
                i, st = json.loads(ln)
            except json.JSONDecodeError:
                break  # a half-written last line
            assert st["generation"] == expected[i]["generation"]
            acked = i
        if not os.path.exists(path):
            assert acked < 0, err.decode()
            continue
        h = make(path)  # must load: never a damaged file
        got = h.pr.status()
        candidates = [expected[k] for k in (acked, acked + 1) if 0 <= k < len(expected)]
        if acked < 0:
            candidates.append(expected[0])
        assert got in [powered_on(c) for c in candidates], (r, acked, got)
        killed_at.append(acked)
    # The kills must land mid-workload for the test to mean anything.
    print("acknowledged steps at kill:", killed_at)
    assert any(0 <= k < len(expected) - 1 for k in killed_at), killed_at


def test_administrators_clear_all_drops_everything_and_the_file(state_path):
    h = populated(state_path)
    generation = h.generation()
    assert os.path.exists(state_path)
    trio.run(h.pr.clear_all)
    st = h.pr.status()
    assert st["registrants"] == [] and st["holder"] is None and st["aptpl"] is False
    assert st["generation"] == generation + 1
    assert not os.path.exists(state_path)  # APTPL ended: nothing comes back on restart
    assert make(state_path).pr.status()["registrants"] == []
    uas = h.take_uas()
    assert sorted(name for name, _asc, _ascq in uas) == sorted([A.name, B.name, C.name])
    assert {(asc, ascq) for _name, asc, ascq in uas} == {(0x2A, 0x03)}  # RESERVATIONS PREEMPTED
