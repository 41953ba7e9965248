"""A bridge restart is a power on for its LUs (SAM-5 6.3.1, SPC-4 6.15.2)."""

from __future__ import annotations

import struct

from .helpers import INI_A, INI_B, assert_check, assert_good, make_target, run

TUR = bytes(6)


def register(key, aptpl=True):
    cdb = struct.pack(">BBBIHB", 0x5F, 0x00, 0, 0, 24, 0)
    return cdb, struct.pack(">QQ4xBxH", 0, key, 0x01 if aptpl else 0, 0)


def read_keys():
    return struct.pack(">BB5sHB", 0x5E, 0x00, bytes(5), 64, 0)


async def test_restart_reports_power_on_and_resets_prgeneration(tmp_path):
    t = make_target(tmp_path)
    try:
        for ini, key in ((INI_A, 0xA1), (INI_B, 0xB2)):
            cdb, data = register(key)
            assert_good(await run(t, cdb, data_out=data, initiator=ini))
        r = await run(t, read_keys(), data_in=64)
        generation, = struct.unpack_from(">I", r.data)
        assert generation == 2
    finally:
        t.close()
    t = make_target(tmp_path)  # the bridge restarts on the same images
    try:
        for ini in (INI_A, INI_B):
            # SAM-5: POWER ON, RESET, OR BUS DEVICE RESET OCCURRED / POWER ON OCCURRED
            r = await run(t, TUR, initiator=ini, clear_ua=False)
            assert_check(r, 0x06, 0x29, 0x01)
            assert_good(await run(t, TUR, initiator=ini, clear_ua=False))
        r = await run(t, read_keys(), data_in=64)
        generation, length = struct.unpack_from(">II", r.data)
        assert generation == 0  # SPC-4 6.15.2: "regardless of the APTPL bit value"
        keys = sorted(struct.unpack_from(f">{length // 8}Q", r.data, 8))
        assert keys == [0xA1, 0xB2]  # APTPL registrations came back
    finally:
        t.close()
