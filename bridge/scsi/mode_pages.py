"""Mode pages of a logical unit (SPC-4 7.5, SBC-3 6.4): current, changeable, default, saved.

Pages: caching (08h, SBC-3 6.4.5) with WCE; control (0Ah, SPC-4 7.5.8) with D_SENSE;
informational exceptions control (1Ch, SPC-4 7.5.12) with DEXCPT. Values are shared by
every I_T nexus of the LU (SPC-4 allows one set of mode parameters per LU); MODE SELECT
on one nexus raises MODE PARAMETERS CHANGED on the others.
"""

from __future__ import annotations

from typing import Any

CACHING = 0x08
CONTROL = 0x0A
INFORMATIONAL_EXCEPTIONS = 0x1C
ALL_PAGES = 0x3F

# Default page contents, page code and length included (PS bit clear).
_DEFAULTS: dict[int, bytes] = {
    # 08h: WCE=1 (bit 2 of byte 2) like a write-back disk cache; everything else 0.
    CACHING: bytes((0x08, 0x12, 0x04)) + bytes(17),
    # 0Ah: QUEUE ALGORITHM MODIFIER 1 (unrestricted reordering), BUSY TIMEOUT PERIOD FFFFh
    # (unlimited).
    CONTROL: bytes((0x0A, 0x0A, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0x00, 0x00)),
    # 1Ch: DEXCPT=1 (no informational exceptions reported), MRIE 0.
    INFORMATIONAL_EXCEPTIONS: bytes((0x1C, 0x0A, 0x08)) + bytes(9),
}

# Bits MODE SELECT may change (SPC-4 7.5.3 page control 01b: changeable values).
_CHANGEABLE: dict[int, bytes] = {
    CACHING: bytes((0, 0, 0x04)) + bytes(17),  # WCE
    CONTROL: bytes((0, 0, 0x04)) + bytes(9),  # D_SENSE
    INFORMATIONAL_EXCEPTIONS: bytes((0, 0, 0x08)) + bytes(9),  # DEXCPT
}

PAGE_ORDER = (CACHING, CONTROL, INFORMATIONAL_EXCEPTIONS)


class ModeParameters:
    """The mode pages of one LU."""

    def __init__(self, saved: dict[str, Any] | None = None) -> None:
        self.saved: dict[int, bytes] = dict(_DEFAULTS)
        for key, value in (saved or {}).items():
            try:
                code = int(key, 16)
                page = bytes.fromhex(value)
            except (TypeError, ValueError):
                continue
            if code in _DEFAULTS and len(page) == len(_DEFAULTS[code]) and self.valid(code, page):
                self.saved[code] = page
        self.current: dict[int, bytearray] = {c: bytearray(p) for c, p in self.saved.items()}

    def restore_saved(self) -> None:
        """SAM-5 6.3.3: a logical unit reset returns mode parameters to the saved values."""
        for code, page in self.saved.items():
            self.current[code][:] = page

    @staticmethod
    def valid(code: int, page: bytes) -> bool:
        """True when ``page`` differs from the default only in changeable bits."""
        default, mask = _DEFAULTS[code], _CHANGEABLE[code]
        return all(((a ^ b) & ~m) == 0 for a, b, m in zip(page, default, mask, strict=True))

    def page(self, code: int, pc: int) -> bytes:
        """Page ``code`` for page control ``pc`` (0 current, 1 changeable, 2 default, 3 saved)."""
        if pc == 0:
            return bytes(self.current[code])
        if pc == 1:
            return bytes((code, len(_DEFAULTS[code]) - 2)) + _CHANGEABLE[code][2:]
        if pc == 2:
            return _DEFAULTS[code]
        return self.saved[code]

    @staticmethod
    def known(code: int) -> bool:
        return code in _DEFAULTS

    @staticmethod
    def length(code: int) -> int:
        return len(_DEFAULTS[code])

    @staticmethod
    def changeable(code: int) -> bytes:
        return _CHANGEABLE[code]

    @staticmethod
    def saved_state(saved: dict[int, bytes]) -> dict[str, str]:
        """The sidecar form of saved pages: those that differ from the defaults, in hex."""
        return {f"{c:02x}": p.hex() for c, p in saved.items() if p != _DEFAULTS[c]}

    @property
    def wce(self) -> bool:
        """SBC-3 6.4.5: write cache enabled; WCE=0 means every WRITE is fdatasync'ed."""
        return bool(self.current[CACHING][2] & 0x04)

    @property
    def d_sense(self) -> bool:
        """SPC-4 7.5.8: descriptor-format sense data."""
        return bool(self.current[CONTROL][2] & 0x04)
