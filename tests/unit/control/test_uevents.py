"""bridge.control.uevents: parsing kernel uevents (pyroute2), sysfs traits of files."""

from __future__ import annotations

from bridge.control.uevents import BlockDeviceWatcher, block_traits, parse_uevent

KERNEL_RESIZE = (b"change@/devices/virtual/block/loop0\0ACTION=change\0"
                 b"DEVPATH=/devices/virtual/block/loop0\0SUBSYSTEM=block\0RESIZE=1\0MAJOR=7\0"
                 b"MINOR=0\0DEVNAME=loop0\0DEVTYPE=disk\0DISKSEQ=11\0SEQNUM=835\0")


def test_parse_a_kernel_resize_event():
    e = parse_uevent(KERNEL_RESIZE)
    assert e["ACTION"] == "change" and e["RESIZE"] == "1" and (e["MAJOR"], e["MINOR"]) == ("7", "0")
    assert e["DEVNAME"] == "loop0" and e["SUBSYSTEM"] == "block"


def test_garbage_parses_to_something_harmless():
    for data in (b"", b"\0\0\0", b"libudev\0" + b"\xff" * 10, b"x=y", b"\xff\xfe=\x80"):
        assert isinstance(parse_uevent(data), dict)


async def test_image_files_have_no_traits_and_events_for_others_are_ignored(ctl, run_dir):
    assert block_traits(str(run_dir / "disk0.img")) is None
    w = BlockDeviceWatcher(ctl.target)
    sizes = [lu.backing.size for lu in ctl.target.logical_units()]
    for event in (parse_uevent(KERNEL_RESIZE), {"SUBSYSTEM": "net"}, {"SUBSYSTEM": "block"},
                  {"SUBSYSTEM": "block", "MAJOR": "x", "MINOR": "1", "ACTION": "change"},
                  {"SUBSYSTEM": "block", "MAJOR": "7", "MINOR": "0", "ACTION": "remove"}):
        w.handle(event)
    assert [lu.backing.size for lu in ctl.target.logical_units()] == sizes
    assert w.resized == 0 and w.removed == {}
