"""``vscsi-bridge serve``: the target core and every configured transport, run as a service.

Start-up, in the order that keeps a failed start from disturbing anything that runs:
the state directory (created 0700, or checked), the instance lock (one bridge per state
directory), the environment ([[xen]] needs /dev/xen), the image locks (QEMU's lock
bytes), the target core, then each listening socket (never unlinking a live one).
Once every socket listens: the description on stdout, ``--ready-file``, and READY=1
to systemd. SIGINT/SIGTERM stop; SIGHUP calls the reload hook (none exists yet: it is
logged and ignored); SIGUSR1 dumps every thread's Python stack to stderr and SIGUSR2
logs each Xen backend's ring state (debugging a stuck guest).
"""

from __future__ import annotations

import faulthandler
import gc
import logging
import os
import signal
import stat
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import trio

from bridge.config import BridgeConfig, format_size
from bridge.daemon import logs, sd_notify
from bridge.daemon.locks import ImageLock, InstanceLock, LockMode
from bridge.startup import EXIT_CONFIG, StartupError

log = logging.getLogger("bridge")

XEN_GNTDEV = "/dev/xen/gntdev"
# What SIGHUP runs; None until the control plane provides a configuration reload.
ReloadHook = Callable[[], Awaitable[None]]


def describe(config: BridgeConfig) -> str:
    """What is served, one line per LU and attachment, with the size actually served."""
    lines = []
    for lu in config.lus:
        facts = config.images.get(lu.name)
        if facts is None:
            size = "size unknown"
        elif facts.exists:
            size = f"{format_size(facts.served_bytes)} served"
        else:
            size = f"{format_size(facts.served_bytes)}, created at start"
        ro = ", read-only" if lu.read_only else ""
        lock = config.locking.get(lu.name)
        locking = "" if lock is None or lock.enabled and not lock.share_rw else \
            ", shared writers allowed" if lock.enabled else ", not locked"
        lines.append(f"LU {lu.name}: {lu.path} ({size}, {lu.block_size}-byte blocks{ro}{locking})")
    for v in config.vfio_user:
        luns = ", ".join(f"LUN {n} = {name}" for n, name in sorted(v.luns.items()))
        owner = "" if v.access.uid is None else f" owner {v.access.uid}"
        group = "" if v.access.gid is None else f" group {v.access.gid}"
        lines.append(f"vfio-user {v.socket} (mode {v.access.mode:04o}{owner}{group}): "
                     f"initiator {v.initiator}: {luns}; target port {v.relative_port} "
                     f"in group {v.port_group}")
    for x in config.xen:
        luns = ", ".join(f"LUN {n} = {name}" for n, name in sorted(x.luns.items()))
        lines.append(f"xen domain {x.domain} vscsi {x.devid}: initiator {x.initiator}: {luns}; "
                     f"target port {x.relative_port} in group {x.port_group}")
    states = ", ".join(f"{g.name} (id {g.id}) {g.state.label}" for g in config.port_groups)
    if states:
        lines.append(f"port groups: {states}")
    return "\n".join(lines)


def environment_problems(config: BridgeConfig) -> list[str]:
    """What the host lacks for this configuration (checked by check-config and serve)."""
    problems = []
    if config.xen and not os.path.exists(XEN_GNTDEV):
        problems.append(f"xen[0]: {XEN_GNTDEV} does not exist: [[xen]] attachments need a Xen dom0 "
                        "with the xen-gntdev module loaded; remove the [[xen]] sections on this host")
    return problems


def prepare_state_dir(config: BridgeConfig) -> None:
    """Create the state directory 0700 (0711 when a socket in it is meant for another
    user, who must be able to reach it), or check that an existing one is safe."""
    path = Path(config.state_dir)
    opened = any(v.access.mode & 0o077 or v.access.uid is not None or v.access.gid is not None
                 for v in config.vfio_user if Path(v.socket).parent == path)
    mode = 0o711 if opened else 0o700
    try:
        path.mkdir(mode=mode, parents=True)
        os.chmod(path, mode)  # mkdir's mode is filtered by the umask
        return
    except FileExistsError:
        pass
    except OSError as e:
        raise StartupError(f"state directory {path}: cannot create: {e.strerror}") from None
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"state directory {path}: exists and is not a directory; "
                           "remove it or set bridge.state_dir", EXIT_CONFIG)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise StartupError(f"state directory {path}: must be owned by this user and writable by "
                           f"nobody else (it is mode {stat.S_IMODE(st.st_mode):04o}, owner {st.st_uid}); "
                           "fix it with chown/chmod")
    if stat.S_IMODE(st.st_mode) != mode:
        # Ours (e.g. systemd's RuntimeDirectory=): the mode the sockets in it need.
        os.chmod(path, mode)


def _lock_images(config: BridgeConfig, existing: bool) -> list[ImageLock]:
    locks = []
    try:
        for lu in config.lus:
            lock = config.locking.get(lu.name)
            if lock is not None and not lock.enabled:
                continue
            if os.path.exists(lu.path) != existing:
                continue
            image_lock = ImageLock(lu.path, LockMode.for_lu(lu.read_only, lock is not None and lock.share_rw))
            image_lock.acquire()
            locks.append(image_lock)
    except BaseException:
        for held in locks:
            held.release()
        raise
    return locks


def _vfio_user_tracer() -> Callable[[object], None]:
    """At debug level: each vfio-user message the client sent, rate-limited per socket
    (the socket and initiator come with the log line's connection context)."""
    from bridge.vfio_user import protocol as p

    limited = logs.RateLimited(logging.getLogger("bridge.vfio_user.trace"))

    def trace(message: object) -> None:
        header = getattr(message, "header", None)
        if header is None or getattr(header, "is_reply", False):
            return
        limited.debug("%s id %d, %d bytes", p.command_name(header.command), header.msg_id,
                      getattr(header, "size", 0))
    return trace


def _dump_xen_backends() -> None:
    """SIGUSR2: ring indexes, requests in flight and counters of every Xen backend."""
    if "bridge.xen.backend" not in sys.modules:
        log.info("SIGUSR2: no Xen backends in this process")
        return
    from bridge.xen.backend import VscsiBackend

    for obj in gc.get_objects():
        if isinstance(obj, VscsiBackend):
            conn = obj.conn
            log.info("SIGUSR2: %s: stats %s ring %s inflight %s", obj.be, obj.stats,
                     conn.ring.indexes() if conn is not None else None,
                     dict(conn.inflight) if conn is not None else None)


async def _signals(cancel: trio.CancelScope, reload: ReloadHook | None) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
                                   signal.SIGUSR2) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                if reload is None:
                    log.warning("SIGHUP: reload not supported yet; still serving the configuration "
                                "loaded at start (restart the service to apply changes)")
                    continue
                log.info("SIGHUP: reloading the configuration")
                await reload()
                continue
            if signum == signal.SIGUSR2:
                _dump_xen_backends()
                continue
            log.info("received %s, shutting down", signal.Signals(signum).name)
            sd_notify.notify("STOPPING=1", "STATUS=stopping")
            cancel.cancel()
            return


async def serve(config: BridgeConfig, ready_file: str | None = None,
                reload: ReloadHook | None = None, config_path: str | None = None) -> None:
    """Run the target core, every configured transport and the control socket until
    SIGINT/SIGTERM."""
    from bridge.attachments import Attachments
    from bridge.control.server import serve_control
    from bridge.scsi.target import Target

    for warning in config.warnings:
        log.warning("%s", warning)
    prepare_state_dir(config)
    instance = InstanceLock(config.state_dir)
    instance.acquire()
    image_locks: list[ImageLock] = []
    target = None
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    except (OSError, ValueError):  # stderr without a file descriptor (embedded, tests)
        log.debug("SIGUSR1 stack dumps unavailable: stderr has no file descriptor")
    try:
        problems = environment_problems(config)
        if problems:
            raise StartupError(problems[0])
        image_locks += _lock_images(config, existing=True)
        target = Target(config.lus, config.lun_maps(), ports=config.port_map())
        image_locks += _lock_images(config, existing=False)  # the images Target just created
        debug = logging.getLogger("bridge").isEnabledFor(logging.DEBUG)
        async with trio.open_nursery() as nursery:
            attachments = Attachments(nursery, target, config,
                                      tracer=_vfio_user_tracer if debug else None)
            for att in config.vfio_user:
                await attachments.add_vfio_user(att)
            if config.xen:
                from bridge.xen.runner import run_xen_backend, xen_config_from

                xen_config = xen_config_from(config)
                xen_config.grant_strategy = config.xen_grant_strategy
                await nursery.start(run_xen_backend, target, None, xen_config)
            access = config.socket_access
            await nursery.start(partial(
                serve_control, target, attachments, state_dir=config.state_dir,
                log_level=config.log_level, config_path=config_path,
                mode=access.mode, owner=access.uid, group=access.gid))
            print(describe(config), flush=True)
            if ready_file:
                Path(ready_file).write_text("ready\n")
            status = f"serving {len(config.lus)} LUs on {len(config.vfio_user)} vfio-user sockets"
            if config.xen:
                status += f" and {len(config.xen)} Xen devices"
            sd_notify.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")
            log.info("%s", status)
            await _signals(nursery.cancel_scope, reload)
    finally:
        faulthandler.unregister(signal.SIGUSR1)
        if target is not None:
            target.close()
        for image_lock in image_locks:
            image_lock.release()
        instance.release()
