"""SCSI target core: logical units, commands, sense, unit attentions, task set, reservations.

Entry points (import them from their modules; this package imports nothing itself):
- ``bridge.scsi.logical_unit.LogicalUnitSpec``: one LU as configured.
- ``bridge.scsi.target.Target``: ``execute(ScsiRequest)``, ``task_management(TmfRequest)``,
  ``luns_for``, ``subscribe``, ``map_lun``, ``unmap_lun``, ``add_logical_unit``, ``resize``,
  ``nexus_loss``, ``close``.

Layout: backing.py (image/device I/O), identity.py (WWN/serial sidecar), logical_unit.py,
command.py (rows and the dispatch table), command_families.py (the declared list of
handler modules the table is built from), cdb.py/buffers.py (sans-I/O helpers), spc.py + vpd.py,
sbc.py, sbc_verify.py, sbc_provisioning.py, mode.py + mode_pages.py, unit_state.py,
rsoc.py, reservations/ (persistent reservations: state, codec, conflict table, rows), unit_attention.py, task_set.py, io_gate.py.
"""
