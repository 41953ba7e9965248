"""CDB helpers shared by the dispatch table and the reservation conflict table (cdb.py)."""

from __future__ import annotations

from bridge.scsi.cdb import SERVICE_ACTION_OPCODES, VARIABLE_LENGTH_CDB, cdb_length, service_action
from bridge.scsi.command_families import COMMAND_TABLE
from bridge.scsi.reservations.table import command_key, conflict_table_rows


def test_service_action_in_byte_1() -> None:
    assert service_action(bytes([0x5F, 0xE6]) + bytes(8)) == 0x06  # bits 7-5 are not the SA
    assert service_action(bytes([0xA3, 0x0C]) + bytes(10)) == 0x0C


def test_service_action_of_a_variable_length_cdb_is_in_bytes_8_and_9() -> None:
    cdb = bytearray(32)
    cdb[0], cdb[7], cdb[8], cdb[9] = 0x7F, 0x18, 0x00, 0x0B  # WRITE(32)
    assert service_action(bytes(cdb)) == 0x000B


def test_no_service_action() -> None:
    assert service_action(bytes(10)) is None  # TEST UNIT READY
    assert service_action(bytes([0x28]) + bytes(9)) is None  # READ(10)
    assert service_action(b"\x5f") is None  # too short to hold one
    assert service_action(b"\x7f" + bytes(8)) is None


def test_cdb_length_from_the_group_code() -> None:
    assert [cdb_length(op) for op in (0x00, 0x28, 0x5F, 0x88, 0xA3)] == [6, 10, 10, 16, 12]
    assert cdb_length(0x7F) is None and cdb_length(0xC0) is None


def test_both_tables_use_the_one_service_action_set() -> None:
    # A dispatch row with a service action has a service-action opcode, and the
    # conflict table finds its rows through the same service_action().
    for op, sa in ((i.opcode, i.service_action) for i in COMMAND_TABLE.rows()):
        assert (sa is not None) == (op in SERVICE_ACTION_OPCODES), (op, sa)
    for row in conflict_table_rows():
        if row.service_action is not None:
            assert row.opcode in SERVICE_ACTION_OPCODES | {VARIABLE_LENGTH_CDB}, row
            assert command_key(row.example_cdb())[:2] == (row.opcode, row.service_action), row
