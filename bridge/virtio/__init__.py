"""The KVM transport, device side: split virtqueues, the virtio-pci transport and the virtio-scsi device.
