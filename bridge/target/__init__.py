"""SCSI target core: logical units, commands, sense, unit attentions, task set, reservations."""
