"""A full memory barrier for rings shared with a guest (virtqueues, Xen shared rings)."""

import threading

_fence_lock = threading.Lock()


def full_fence() -> None:
    """A store-load barrier between our ring writes and the next ring read.

    x86 may reorder a store with a later load; a lock-prefixed instruction (taken
    here by an uncontended lock acquire) orders them. This is the mb() of virtio
    1.2 2.7.7.2 / 2.7.10.1 and the xen_mb() of Xen's ring.h final checks, without
    which both ends can go to sleep with work pending (a lost wake-up).
    """
    _fence_lock.acquire()
    _fence_lock.release()
