"""Locks that keep two processes from serving the same thing.

* ``InstanceLock``: one bridge per state directory. An open file description (OFD)
  lock on ``<state_dir>/vscsi-bridge.pid``, which also holds the PID so that a second
  ``serve`` can say who has it. The kernel drops the lock when the process dies, so a
  ``kill -9`` never leaves a stale lock behind.
* ``ImageLock``: an LU's image locked the way QEMU's file-posix driver locks it
  (block/file-posix.c: raw_apply_lock_bytes / raw_check_lock_bytes), so that a bridge
  and a QEMU (or qemu-img, or another bridge) exclude each other. QEMU takes shared
  OFD locks on single bytes: byte 100+i while it holds permission i, byte 200+i while
  it does not let others have permission i; it then tests (F_OFD_GETLK with a write
  lock) byte 200+i for each permission it wants and byte 100+i for each it refuses.
  Permission bits (include/block/block-common.h): 0 consistent read, 1 write,
  2 write unchanged, 3 resize.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass

from bridge.startup import StartupError

# struct flock on Linux x86-64/arm64: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (padded to 32 bytes). l_pid must be 0 for OFD locks.
_FLOCK = struct.Struct("=hh4xqqi4x")
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)

PERM_BASE = 100
SHARED_BASE = 200
PERM_CONSISTENT_READ = 1 << 0
PERM_WRITE = 1 << 1
PERM_WRITE_UNCHANGED = 1 << 2
PERM_RESIZE = 1 << 3
PERM_ALL = PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE
_PERM_NAMES = {PERM_CONSISTENT_READ: "consistent read", PERM_WRITE: "write",
               PERM_WRITE_UNCHANGED: "write unchanged", PERM_RESIZE: "resize"}


def ofd_lock(fd: int, start: int, length: int, kind: int) -> None:
    """Take (or with F_UNLCK drop) an OFD lock without waiting; OSError EAGAIN if held."""
    fcntl.fcntl(fd, F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))


def ofd_conflict(fd: int, start: int, length: int, kind: int = fcntl.F_WRLCK) -> int:
    """The type of a lock another open file description holds that would block ``kind``
    on the range (F_UNLCK if none). Locks of ``fd``'s own description never conflict."""
    out = fcntl.fcntl(fd, F_OFD_GETLK, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))
    return _FLOCK.unpack(out)[0]


class InstanceLock:
    """``<state_dir>/vscsi-bridge.pid`` locked for the life of this process."""

    NAME = "vscsi-bridge.pid"

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, self.NAME)
        self.fd = -1

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            ofd_lock(fd, 0, 0, fcntl.F_WRLCK)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise StartupError(f"instance lock {self.path}: {e.strerror}") from None
            who = f"PID {holder}" if holder else "another process"
            raise StartupError(f"another vscsi-bridge ({who}) is already serving state directory "
                               f"{os.path.dirname(self.path)} (lock {self.path}); stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            # Truncate, do not unlink: unlinking would let a third process lock a new
            # file while a second still waits on this one.
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = -1


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


@dataclass(frozen=True)
class LockMode:
    """The permissions a holder takes (``perm``) and lets others have (``shared``)."""

    perm: int
    shared: int

    @classmethod
    def for_lu(cls, read_only: bool, share_rw: bool) -> LockMode:
        if read_only:
            # As a read-only QEMU drive: read, and nobody else may write.
            return cls(PERM_CONSISTENT_READ, PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED)
        if share_rw:
            # As QEMU's share-rw=on: others may write too (cluster file systems).
            return cls(PERM_CONSISTENT_READ | PERM_WRITE, PERM_ALL & ~PERM_RESIZE)
        return cls(PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
                   PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED)


class ImageLock:
    """QEMU-compatible lock bytes on an LU's image, held on a descriptor of their own."""

    def __init__(self, path: str, mode: LockMode) -> None:
        self.path = path
        self.mode = mode
        self.fd = -1

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for i in range(4):
                bit = 1 << i
                if self.mode.perm & bit:
                    ofd_lock(fd, PERM_BASE + i, 1, fcntl.F_RDLCK)
                if not self.mode.shared & bit:
                    ofd_lock(fd, SHARED_BASE + i, 1, fcntl.F_RDLCK)
            problem = self._conflict(fd)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                problem = "locked by another process"
            else:
                raise StartupError(f"image {self.path}: cannot lock: {e.strerror}") from None
            self._refuse(problem)
        if problem:
            os.close(fd)
            self._refuse(problem)
        self.fd = fd

    def _conflict(self, fd: int) -> str | None:
        for i in range(4):
            bit = 1 << i
            if self.mode.perm & bit and ofd_conflict(fd, SHARED_BASE + i, 1) != fcntl.F_UNLCK:
                return f"another process does not share \"{_PERM_NAMES[bit]}\""
            if not self.mode.shared & bit and ofd_conflict(fd, PERM_BASE + i, 1) != fcntl.F_UNLCK:
                return f"another process holds \"{_PERM_NAMES[bit]}\""
        return None

    def _refuse(self, problem: str) -> None:
        raise StartupError(
            f"image {self.path}: in use ({problem}: a QEMU, qemu-img or another bridge has it "
            "open); stop that process, or set share_rw = true on the LU if both may write it "
            "(cluster file system), or locking = false to take no locks")

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the description drops its OFD locks
            self.fd = -1
