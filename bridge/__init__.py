"""vscsi-bridge: one SCSI target core for KVM (virtio-scsi over vfio-user) and Xen (vscsiif) guests."""
