"""Memory budget per attached guest (tests/hostile/memory.py measures; figures in the
README's "Resource budgets"): one more vfio-user guest attached and doing I/O may cost the
bridge at most PER_GUEST_KIB of its own memory (RssAnon), and the whole process with 32
guests attached stays under TOTAL_32_KIB (VmRSS, guest pages it touched included).

Measured 2026-12-06: ~290 KiB per guest, 42 MiB VmRSS with 32 guests (32 MiB idle)."""

from __future__ import annotations

from tests.hostile.memory import measure, per_attachment_kib

PER_GUEST_KIB = 1024
TOTAL_32_KIB = 96 * 1024


def test_memory_per_attached_guest() -> None:
    one, many = measure(1), measure(32)
    per_guest = per_attachment_kib(one, many, 1, 32)
    assert per_guest <= PER_GUEST_KIB, (per_guest, one, many)
    assert many["attached"]["VmRSS"] <= TOTAL_32_KIB, many
