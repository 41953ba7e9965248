"""Test doubles for the Xen side, outside the installed package: a simulated platform
(guest memory, grant table, event channels: ``platform``) and an in-process xenstored
(``xenstored``). Imported as ``tests.xen_sim`` from the repository root (as pytest runs
it, ``python -m pytest``) by tests/unit/xen and tests/integration/test_one_core_both_guests.py;
nothing in bridge/ or images/ uses them.
"""
