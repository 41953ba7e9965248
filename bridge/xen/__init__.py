"""Xen PV-SCSI (vscsiif) backend: ring, xenbus state machine, platform interfaces."""
