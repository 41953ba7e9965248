"""Listening unix sockets the bridge creates (vfio-user now, the control socket later).

One helper so that every socket gets the same care: a path left by an earlier run is
removed only when nothing listens on it (a second bridge must never unlink a live
bridge's socket), anything that is not a socket is never removed, and the socket gets
its configured mode, owner and group before anyone can connect (bound under a
restrictive umask, then chmod/chown, then listen). The server that bound it unlinks it
when it stops; a process that failed here never bound anything and unlinks nothing.
"""

from __future__ import annotations

import errno
import os
import socket as stdsocket
import stat
from dataclasses import dataclass

import trio

from bridge.startup import StartupError


@dataclass(frozen=True)
class SocketAccess:
    """Who may connect to a unix socket the bridge creates: its mode, owner and group.

    ``uid``/``gid`` None keep the process's own (root for a system service).
    """

    mode: int = 0o600
    uid: int | None = None
    gid: int | None = None


def _listening(path: str) -> bool:
    """Whether some process accepts connections on ``path`` (connect, then close)."""
    probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as e:
        # ECONNREFUSED: a socket file nobody listens on (left by a killed process).
        # EAGAIN: a live listener whose backlog is full, so it is in use.
        return e.errno == errno.EAGAIN
    finally:
        probe.close()
    return True


def clear_stale_socket(path: str) -> None:
    """Remove ``path`` if it is a socket nobody listens on; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"socket {path}: exists and is not a socket; remove it or choose another path",
                           exit_code=2)
    if _listening(path):
        raise StartupError(f"socket {path}: another process is listening on it; "
                           "stop it or choose another socket path")
    os.unlink(path)


def bind_unix_listener(path: str, access: SocketAccess, backlog: int = 1) -> trio.socket.SocketType:
    """A listening AF_UNIX stream socket at ``path`` with ``access``'s mode, owner, group."""
    clear_stale_socket(path)
    sock = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM | stdsocket.SOCK_CLOEXEC)
    try:
        # bind() creates the file with 0777 & ~umask: bind under umask 0177 so that the
        # socket is never connectable by others between bind and chmod (no checkpoint
        # between the two umask calls: binding a unix path does not block).
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        try:
            if access.uid is not None or access.gid is not None:
                os.chown(path, -1 if access.uid is None else access.uid,
                         -1 if access.gid is None else access.gid)
            os.chmod(path, access.mode)
            sock.listen(backlog)
        except BaseException:
            os.unlink(path)  # ours: bound a moment ago
            raise
    except OSError as e:
        sock.close()
        raise StartupError(_describe_bind_error(path, e)) from None
    except BaseException:
        sock.close()
        raise
    return trio.socket.from_stdlib_socket(sock)


def _describe_bind_error(path: str, e: OSError) -> str:
    parent = os.path.dirname(path) or "."
    if e.errno == errno.ENOENT:
        return f"socket {path}: directory {parent} does not exist; create it or correct the path"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"socket {path}: permission denied ({e.strerror}); check the owner and mode of {parent}"
    if e.errno == errno.EADDRINUSE:
        return f"socket {path}: already in use; stop the process that has it or choose another path"
    return f"socket {path}: {e.strerror or e}"
