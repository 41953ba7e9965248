"""State files next to an image (state_file.py): created privately, never through a symlink."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.scsi import state_file
from bridge.scsi.identity import sidecar_path
from bridge.scsi.reservations import pr_out_cdb, state_path_for

from .helpers import INI_A, assert_check, assert_good, make_target, run
from .test_saves_off_the_loop import KEY_A, REGISTER, params, prout


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 0: the mode is the one the code asks for, not one the umask trimmed."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode_of(path: str | Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_written_files_are_0600(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "x.json"
    state_file.write_atomically(str(path), b"{}\n")
    assert path.read_bytes() == b"{}\n"
    assert mode_of(path) == 0o600
    path.chmod(0o644)  # an older file, world-readable: the next write replaces it
    state_file.write_atomically(str(path), b"[]\n")
    assert mode_of(path) == 0o600 and path.read_bytes() == b"[]\n"
    assert not os.path.exists(state_file.temp_path(str(path)))


async def test_identity_sidecar_and_aptpl_state_are_not_world_readable(
        tmp_path: Path, open_umask: None) -> None:
    image = str(tmp_path / "disk0.img")
    t = make_target(tmp_path)
    try:
        assert mode_of(sidecar_path(image)) == 0o600
        assert_good(await run(t, bytes(6)))
        assert await prout(t, INI_A, REGISTER, 0, KEY_A) == 0  # APTPL=1
        assert mode_of(state_path_for(image)) == 0o600
        cdb = bytes((0x15, 0x11, 0, 0, 24, 0))  # MODE SELECT(6), SP=1: rewrites the sidecar
        data = bytes(4) + bytes((0x08, 0x12, 0x00)) + bytes(17)
        assert_good(await run(t, cdb, data_out=data))
        assert mode_of(sidecar_path(image)) == 0o600
    finally:
        t.close()


def test_a_symlink_planted_at_the_temp_path_is_refused_not_followed(tmp_path: Path) -> None:
    path = str(tmp_path / "disk0.img.pr.json")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, state_file.temp_path(path))
    with pytest.raises(OSError, match="not a regular file"):
        state_file.write_atomically(path, b"{}\n")
    assert victim.read_bytes() == b"precious"
    assert os.path.islink(state_file.temp_path(path))  # left for the operator to see
    assert not os.path.exists(path)
    # A dangling symlink (to a file the write would create) is refused as well.
    dangling = tmp_path / "would-be-created"
    os.unlink(state_file.temp_path(path))
    os.symlink(dangling, state_file.temp_path(path))
    with pytest.raises(OSError):
        state_file.write_atomically(path, b"{}\n")
    assert not dangling.exists()


def test_a_stale_temp_file_from_a_crash_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "disk0.img.pr.json")
    Path(state_file.temp_path(path)).write_text("{half a wri")
    state_file.write_atomically(path, b'{"whole": true}\n')
    assert json.loads(Path(path).read_text()) == {"whole": True}
    assert not os.path.exists(state_file.temp_path(path))


def test_discard_stale_temp_removes_only_regular_files(tmp_path: Path) -> None:
    path = str(tmp_path / "s.json")
    state_file.discard_stale_temp(path)  # nothing there: nothing to do
    Path(state_file.temp_path(path)).write_text("stale")
    state_file.discard_stale_temp(path)
    assert not os.path.lexists(state_file.temp_path(path))
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(victim, state_file.temp_path(path))
    state_file.discard_stale_temp(path)
    assert os.path.islink(state_file.temp_path(path)) and victim.read_text() == "keep"


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "s.json")
    state_file.write_atomically(path, b"old\n")

    def full(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state_file.os, "fsync", full)
    with pytest.raises(OSError):
        state_file.write_atomically(path, b"new\n")
    monkeypatch.undo()
    assert Path(path).read_bytes() == b"old\n"
    assert not os.path.lexists(state_file.temp_path(path))


async def test_a_refused_aptpl_save_fails_the_pr_out_and_keeps_the_state(tmp_path: Path) -> None:
    image = str(tmp_path / "disk0.img")
    t = make_target(tmp_path)
    try:
        assert_good(await run(t, bytes(6)))
        os.symlink(tmp_path / "elsewhere", state_file.temp_path(state_path_for(image)))
        data = params(0, KEY_A)  # REGISTER with APTPL=1
        r = await run(t, pr_out_cdb(REGISTER, 0, len(data)), data_out=data)
        assert_check(r, 0x4, 0x44, 0x00)  # HARDWARE ERROR, INTERNAL TARGET FAILURE
        assert t.logical_unit("disk0").reservations.status()["registrants"] == []
        assert not (tmp_path / "elsewhere").exists()
    finally:
        t.close()
