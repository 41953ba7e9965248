"""v-dev / p-dev parsing: ASCII digits only (issue 15 item 9), with a clear error."""

import re

import pytest

from bridge.xen.devices import VDev, ascii_decimal, parse_pdev, pdev_lun
from bridge.xen.runner import xen_config_from
from bridge.xen.toolstack import VDevSpec, _specs
from bridge.xen.xs_wire import XsProtocolError, parse_perms

# superscript 2, Arabic-Indic 3, fullwidth 1, and one after an ASCII digit
UNICODE_DIGITS = ["\u00b2", "\u0663", "\uff11", "1\u0660"]


def test_vdev_and_pdev_accept_ascii_decimal():
    assert VDev.parse("0:0:1:255\0") == VDev(0, 0, 1, 255)
    assert parse_pdev(" 17 ") == 17 and parse_pdev("1:2:3:4") == 4
    assert parse_pdev("99999") == 99999 and parse_pdev("100000") is None
    assert VDev.parse("0:0:0:65536") is None and VDev.parse("0:0:0") is None


@pytest.mark.parametrize("digit", UNICODE_DIGITS)
def test_unicode_digits_are_refused_not_crashed_on(digit):
    assert VDev.parse(f"0:0:0:{digit}") is None
    assert parse_pdev(digit) is None
    assert parse_pdev(f"0:0:0:{digit}") is None
    with pytest.raises(ValueError, match="ASCII digits"):
        VDev.from_text(f"0:{digit}:0:0")
    with pytest.raises(ValueError, match="p-dev .* ASCII digits"):
        pdev_lun(digit)


def test_configured_vdev_error_names_the_field():
    with pytest.raises(ValueError, match=re.escape("v-dev '0:0:\u00b2:0': field '\u00b2' is")):
        _specs([VDevSpec(1, "0:0:\u00b2:0")])
    with pytest.raises(ValueError, match="is not h:c:t:l"):
        VDevSpec(1, "0:0:1").resolved()


def test_ascii_decimal_limits():
    assert ascii_decimal("65535") == 65535
    for bad in ["", "-1", "+1", "1_0", " 1", "65536", "000001"]:
        with pytest.raises(ValueError):
            ascii_decimal(bad)


def test_other_decimal_names_refuse_unicode_digits():
    with pytest.raises(XsProtocolError):
        parse_perms(b"n\xc2\xb2\0")  # "n²": not a domid

    class Att:
        domain, devid, initiator, luns = "\u00b2", 0, None, {}

    class Cfg:
        xen = [Att()]

    (d,) = xen_config_from(Cfg()).domains
    assert (d.name, d.domid) == ("\u00b2", None)  # a name, not int("²") raising
