"""Vetting the file descriptors a vfio-user client sends before we use them.

Two kinds of fd arrive (vfio-user.rst): guest memory with DMA_MAP, and
interrupt eventfds with DEVICE_SET_IRQS. Either can be anything the client
has open, so each is checked for what it must be:

- DMA memory must be a memfd sealed against shrinking (F_SEAL_SHRINK, see
  memfd_create(2)). A mapped file that shrinks turns the next access into
  SIGBUS, which kills the whole bridge. QEMU's memory-backend-memfd seals by
  default (seal=on: F_SEAL_GROW|F_SEAL_SHRINK|F_SEAL_SEAL, backends/hostmem-memfd.c),
  hugetlb=on included, so a real QEMU loses nothing. Everything else is refused:
  an unsealed memfd, a plain or tmpfs file (memory-backend-file, even on
  /dev/shm), a hugetlbfs file, a device. Any of those can be truncated under
  us; there is no way to make the access safe afterwards.
- An interrupt fd must be an eventfd (its /proc/self/fd link reads
  "anon_inode:[eventfd]"; without /proc every fd is refused), and it is made non-blocking: a write to an eventfd
  whose counter is full, or to a pipe nobody reads, would otherwise block the
  bridge's only thread and every guest with it. The flag is on the open file,
  shared with the client; QEMU's event notifiers are non-blocking already.
"""

from __future__ import annotations

import errno
import fcntl
import os

from bridge.vfio_user.protocol import ProtocolError

EVENTFD_LINK = "anon_inode:[eventfd]"


def fd_kind(fd: int) -> str:
    """What /proc says the fd is (e.g. "/memfd:guest (deleted)", "pipe:[123]")."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        return f"unknown ({exc.strerror})"


def check_sealed_memory(fd: int, offset: int, size: int) -> None:
    """Raise ProtocolError unless [offset, offset+size) of ``fd`` can never vanish."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = None  # not a file that supports seals (anything but memfd/shmem)
    if seals is None or not seals & fcntl.F_SEAL_SHRINK:
        raise ProtocolError(
            errno.EINVAL,
            f"DMA_MAP fd ({fd_kind(fd)}) is not a memfd sealed with F_SEAL_SHRINK: it could "
            "shrink under the mapping (use memory-backend-memfd with seal=on, the default)")
    # The size is checked after the seal: once sealed it can only grow.
    st_size = os.fstat(fd).st_size
    if offset + size > st_size:
        raise ProtocolError(
            errno.EINVAL,
            f"DMA_MAP {offset:#x}+{size:#x} extends past the end of its memfd ({st_size:#x})")


def check_eventfd(fd: int) -> None:
    """Raise ProtocolError unless ``fd`` is an eventfd; make it non-blocking."""
    kind = fd_kind(fd)
    if kind != EVENTFD_LINK:
        raise ProtocolError(errno.EINVAL, f"interrupt fd is {kind}, not an eventfd")
    os.set_blocking(fd, False)
