"""What the files a configuration names are on this host, checked without serving: an
LU's image (missing with no size to create it, a directory, empty, not a whole number
of blocks: what will be served) and a vfio-user socket path (too long for AF_UNIX, in a
missing directory, something other than a socket). What only serving can find out (a
socket in use, a lock held) is bridge/service.py's.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from bridge.config_toml import ConfigError, format_size

# sockaddr_un.sun_path is 108 bytes including the terminating NUL (unix(7)).
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class ImageFacts:
    """What is served from an LU's image: the bytes on disk, or the size it will be created at."""

    exists: bool
    served_bytes: int
    block_device: bool = False


def image_facts(where: str, path: Path, size: int | None, block_size: int,
                 warnings: list[str], size_reported: bool = False) -> ImageFacts:
    """Check an LU's image path without opening it for I/O; what will be served.

    ``size_reported``: the size field had an error already, so do not add another."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise ConfigError(f"{where}.path", f"directory {path.parent} does not exist; create it "
                                               "or correct the path") from None
        if size is None and not size_reported:
            raise ConfigError(f"{where}.size", f"is required because {path} does not exist") from None
        return ImageFacts(exists=False, served_bytes=size or 0)
    except OSError as e:
        raise ConfigError(f"{where}.path", f"{path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{where}.path", f"{path} is a directory, not an image file or block device")
    if stat.S_ISBLK(st.st_mode):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"{where}.path", f"{path}: {e.strerror}") from None
        try:
            length = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
        block_device = True
    elif stat.S_ISREG(st.st_mode):
        length, block_device = st.st_size, False
    else:
        raise ConfigError(f"{where}.path", f"{path} is neither a regular file nor a block device")
    if length < block_size:
        raise ConfigError(f"{where}.path", f"{path} is {length} bytes, smaller than one "
                                           f"{block_size}-byte block; give it a size or use another image")
    served = length - length % block_size
    if served != length:
        warnings.append(f"{where}.path: {path} is {length} bytes, not a multiple of {block_size}: "
                        f"{served // block_size} block{'s' if served // block_size != 1 else ''} "
                        f"({format_size(served)}) served, "
                        f"the last {length - served} bytes are not")
    if size is not None and size != length and not size_reported:
        warnings.append(f"{where}.size: {format_size(size)} ignored: {path} exists and is "
                        f"{format_size(length)} (an existing image is never resized)")
    return ImageFacts(exists=True, served_bytes=served, block_device=block_device)


def check_socket_path(where: str, sock: Path, state_dir: Path) -> None:
    """A unix socket path fits sockaddr_un, its directory exists (the state directory is
    created by serve), and it is not something other than a socket."""
    length = len(os.fsencode(sock))
    if length > MAX_SOCKET_PATH:
        raise ConfigError(where, f"{sock} is {length} bytes, longer than the {MAX_SOCKET_PATH} a "
                                 "unix socket path may have; use a shorter state_dir or socket name")
    if sock.parent != state_dir and not sock.parent.is_dir():
        raise ConfigError(where, f"directory {sock.parent} does not exist; create it or correct the path")
    try:
        st = os.lstat(sock)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ConfigError(where, f"{sock}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(where, f"{sock} exists and is not a socket; remove it or choose another path")
