"""The KVM transport, device side: split virtqueues, virtio-pci and the virtio-scsi device."""
