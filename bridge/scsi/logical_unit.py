"""A logical unit: backing store, identity, mode pages, reservations, task set."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import trio

from .backing import Backing, create_sparse_image
from .device_traits import device_traits, physical_block_size
from .identity import encode_sidecar, parse_wwn, resolve_identity, sidecar_path
from .io_gate import IoGate
from .mode_pages import ModeParameters
from .reservations import PersistentReservations, state_path_for
from .sanitize_state import SanitizeState
from .state_file import write_atomically
from .task_set import TaskSet

log = logging.getLogger(__name__)

BLOCK_SIZES = (512, 4096)


@dataclass
class LogicalUnitSpec:
    """What the configuration says about one LU.

    ``size`` (bytes) is used only to create a sparse image when ``path`` is missing;
    an existing image or device is never grown or shrunk. ``wwn`` is 'naa.' + 32 hex
    digits (NAA 6) or 16 hex digits (see identity.parse_wwn).
    """

    name: str
    path: str
    size: int | None = None
    block_size: int = 512
    read_only: bool = False
    wwn: str | None = None
    serial: str | None = None
    vendor: str = "VSCSIBRG"
    product: str = "vscsi-bridge"
    # SBC-3 5.17 / 4.6: the physical block (e.g. 4096 for a 512e disk); None = one
    # logical block. A power-of-two multiple of block_size, at most 2^15 of them.
    physical_block_size: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not self.name:
            raise ValueError("name: must not be empty")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size: {self.block_size} is not 512 or 4096")
        if self.size is not None and (self.size <= 0 or self.size % self.block_size):
            raise ValueError(f"size: {self.size} is not a positive multiple of block_size")
        if self.physical_block_size is not None:
            check_physical_block_size(self.physical_block_size, self.block_size)
        if self.wwn is not None:
            parse_wwn(self.wwn)
        if not self.vendor.isascii() or len(self.vendor) > 8:
            raise ValueError("vendor: at most 8 ASCII characters")
        if not self.product.isascii() or len(self.product) > 16:
            raise ValueError("product: at most 16 ASCII characters")


class LogicalUnit:
    def __init__(self, spec: LogicalUnitSpec, unit_attention: Callable[[str, int, int], None]) -> None:
        spec.validate()
        self.spec = spec
        self.name = spec.name
        self.block_size = spec.block_size
        self.read_only = spec.read_only
        if not os.path.exists(spec.path):
            if spec.size is None:
                raise ValueError(f"path: {spec.path} does not exist and no size is given to create it")
            create_sparse_image(spec.path, spec.size)
        self.backing = Backing(spec.path, spec.read_only)
        try:
            if spec.size is not None and spec.size != self.backing.size:
                log.warning("LU %s: %s is %d bytes, configured size %d ignored",
                            spec.name, spec.path, self.backing.size, spec.size)
            if self.backing.size < self.block_size:
                raise ValueError(f"path: {spec.path} is smaller than one block")
            # A block device's own limits and kind (device_traits.py); None for a file.
            self.traits = device_traits(self.backing.fd)
            self.physical_block_size = (spec.physical_block_size
                                        or physical_block_size(self.traits, self.block_size)
                                        or self.block_size)
            # READ CAPACITY(16) LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT (SBC-3 5.17)
            self.lbppb_exponent = (self.physical_block_size // self.block_size).bit_length() - 1
            self.identity, self._sidecar = resolve_identity(spec.path, spec.wwn, spec.serial)
            self.mode = ModeParameters(self._sidecar.get("mode") if isinstance(
                self._sidecar.get("mode"), dict) else None)
            self.reservations = PersistentReservations(spec.name, state_path_for(spec.path),
                                                       unit_attention)
        except BaseException:
            self.backing.close()
            raise
        self.tasks = TaskSet()
        self.write_gate = IoGate()
        self.lbprz = True  # punched holes read back as zeros (fallocate PUNCH_HOLE)
        self.prevent_removal: set[str] = set()
        self.stopped = False
        self.sanitize = SanitizeState()  # SBC-3 4.11 (sbc_sanitize.py)
        # MODE SELECT runs one at a time per LU: saved pages are written in the order
        # they apply (SPC-4 6.11, SP=1), current pages change in that order too.
        self.mode_changes = trio.Lock()
        log.info("LU %s: %s, %d blocks of %d bytes%s, %s", spec.name, spec.path, self.num_blocks,
                 self.block_size, " read-only" if self.read_only else "",
                 "naa." + self.identity.wwn.hex())

    @property
    def num_blocks(self) -> int:
        return self.backing.size // self.block_size

    async def save_mode_pages(self, saved: dict[int, bytes]) -> None:
        """MODE SELECT with SP=1: ``saved`` becomes the saved mode pages once it is durable
        in the identity sidecar (written in a worker thread; OSError leaves all unchanged).

        Callers hold ``mode_changes`` so that saves are written in the order they apply.
        """
        sidecar = {**self._sidecar, "mode": ModeParameters.saved_state(saved)}
        payload = encode_sidecar(sidecar)
        await trio.to_thread.run_sync(write_atomically, sidecar_path(self.spec.path), payload)
        self._sidecar = sidecar
        self.mode.saved = saved

    def resize(self, new_size: int) -> None:
        """Grow/shrink a regular image to ``new_size``; re-read a block device's size."""
        if not self.backing.is_block_device and not self.read_only:
            os.ftruncate(self.backing.fd, new_size)
        self.backing.refresh_size()

    def close(self) -> None:
        self.backing.close()


def check_physical_block_size(physical_block_size: int, block_size: int) -> None:
    """SBC-3 5.16.2: LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT is 0..15, so the
    physical block is the logical one times a power of two up to 2^15."""
    ratio, rest = divmod(physical_block_size, block_size)
    if rest or ratio < 1 or ratio & (ratio - 1) or ratio > 1 << 15:
        raise ValueError(f"physical_block_size: {physical_block_size} is not a "
                         f"power-of-two multiple of block_size ({block_size})")
