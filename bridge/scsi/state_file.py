"""Small state files next to an image, written atomically and privately.

Used for the APTPL reservation state (SPC-4 5.13.5) and the identity sidecar (WWN,
serial, saved mode pages). A write is: a temp file created with O_CREAT|O_EXCL|
O_NOFOLLOW and mode 0600 (never an existing file, never through a symlink, never
world-readable), write, fsync, rename over the file, fsync of the directory. A crash
leaves either the old file or the new one; a temp file left by a crash is a write
that was never renamed, hence never acknowledged, and is removed.

Blocking file work: call these from a worker thread (trio.to_thread.run_sync) when
on the event loop.
"""

from __future__ import annotations

import errno
import os
import stat

FILE_MODE = 0o600
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def temp_path(path: str) -> str:
    return path + ".tmp"


def discard_stale_temp(path: str) -> None:
    """Remove the temp file of ``path`` left by a crash, when it is a regular file.

    Anything else at the temp path (a planted symlink, a directory) is left alone;
    the next write refuses it.
    """
    tmp = temp_path(path)
    try:
        st = os.lstat(tmp)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode):
        os.unlink(tmp)


def _create_temp(path: str) -> int:
    tmp = temp_path(path)
    try:
        return os.open(tmp, _CREATE, FILE_MODE)
    except FileExistsError:
        st = os.lstat(tmp)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EEXIST, "refusing a temp path that is not a regular file "
                          "(a symlink?)", tmp) from None
        os.unlink(tmp)  # stale, from a crash
        # A second EEXIST means another writer raced us: refused, not shared.
        return os.open(tmp, _CREATE, FILE_MODE)


def fsync_directory(path: str) -> None:
    """Make a rename or unlink in the directory of ``path`` durable."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, payload: bytes) -> None:
    """Replace ``path`` with ``payload``: durable when this returns, else unchanged."""
    fd = _create_temp(path)
    try:
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp_path(path), path)
    except BaseException:
        try:
            os.unlink(temp_path(path))
        except OSError:
            pass
        raise
    fsync_directory(path)


def remove_durably(path: str) -> None:
    """Remove ``path`` (if present) and make the removal durable."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_directory(path)
