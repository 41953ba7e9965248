"""The dispatch table is built from the families declared in command_families.py."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import ModuleType

import pytest

import bridge.scsi
from bridge.scsi.command import CommandRows, CommandTable
from bridge.scsi.command_families import COMMAND_TABLE, FAMILIES, build_table


def modules_with_rows(package: ModuleType) -> list[ModuleType]:
    """Every module of ``package`` (recursively) that defines command rows."""
    found = []
    for m in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        module = importlib.import_module(m.name)
        if any(isinstance(v, CommandRows) for v in vars(module).values()):
            found.append(module)
    return found


def unlisted(package: ModuleType, families: tuple[ModuleType, ...]) -> list[str]:
    return sorted(m.__name__ for m in modules_with_rows(package) if m not in families)


def test_every_handler_module_is_a_declared_family() -> None:
    assert unlisted(bridge.scsi, FAMILIES) == []
    assert len(modules_with_rows(bridge.scsi)) == len(FAMILIES)


def test_every_row_of_every_family_is_in_the_table() -> None:
    n = 0
    for family in FAMILIES:
        assert isinstance(family.ROWS, CommandRows), family.__name__
        assert family.ROWS.rows, f"{family.__name__} has no rows"
        for info in family.ROWS.rows:
            assert COMMAND_TABLE.get((info.opcode, info.service_action)) is info, info.name
            n += 1
    assert len(COMMAND_TABLE) == n


def test_a_handler_module_left_out_of_the_list_is_detected(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "more_commands"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "extra.py").write_text(
        "from bridge.scsi.command import CommandRows\n"
        "ROWS = CommandRows()\n"
        "@ROWS.command(0xC0, None, 'VENDOR C0', 'c0 00 00 00 00 00')\n"
        "async def vendor(cmd):\n"
        "    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    more = importlib.import_module("more_commands")
    extra = importlib.import_module("more_commands.extra")
    assert unlisted(more, FAMILIES) == ["more_commands.extra"]
    # ... and its row is not dispatched unless the family is listed
    assert (0xC0, None) not in COMMAND_TABLE
    assert (0xC0, None) in build_table((*FAMILIES, extra))


def test_two_families_with_the_same_row_are_refused() -> None:
    a, b = CommandRows(), CommandRows()

    async def handler(cmd: object) -> None:
        return None

    a.command(0x00, None, "TEST UNIT READY", "00 00 00 00 00 00")(handler)
    b.command(0x00, None, "TEST UNIT READY again", "00 00 00 00 00 00")(handler)
    with pytest.raises(ValueError, match="duplicate row"):
        CommandTable([a, b])


def test_a_row_checks_its_usage_data_and_service_action() -> None:
    rows = CommandRows()
    with pytest.raises(ValueError, match="start with the opcode"):
        rows.command(0x00, None, "x", "01 00 00 00 00 00")
    with pytest.raises(ValueError, match="the CDB 10"):
        rows.command(0x28, None, "x", "28 00 00 00 00 00")
    with pytest.raises(ValueError, match="service-action opcode"):
        rows.command(0x28, 0x01, "x", "28 00 00 00 00 00 00 00 00 00")
    with pytest.raises(ValueError, match="service-action opcode"):
        rows.command(0x9E, None, "x", "9e 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00")
