"""virtio-scsi request types, split virtqueues and the virtio-pci device model."""
