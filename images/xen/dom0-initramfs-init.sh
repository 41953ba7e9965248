#!/bin/sh
# dom0 initramfs /init: load virtio_pci + 9p, mount the root share (9p, cache=loose: cache=none is
# about 3x slower) and the per-run shares under it, then switch_root into the dom0 init of the run.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "vscsi-dom0-initramfs: loading $(wc -l </lib/modules/order) modules"
for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m" 2>/dev/null || grep -q "^${m%.ko} " /proc/modules \
        || echo "vscsi-dom0-initramfs: insmod $m failed"
done
tags() { cat /sys/bus/virtio/drivers/9pnet_virtio/*/mount_tag 2>/dev/null | tr '\0' ' '; }
i=0
while ! tags | grep -qw root; do
    i=$((i + 1)); [ $i -gt 100 ] && break; sleep 0.1
done
opts=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o "$opts,cache=loose" root /newroot || {
    echo "vscsi-dom0-initramfs: cannot mount the root share (tags: $(tags))"; exec sh; }
for share in img run src; do
    if tags | grep -qw $share; then
        # run is written by dom0 and read by the host after the run: no client cache there.
        cache=loose; [ $share = run ] && cache=none
        mount -t 9p -o "$opts,cache=$cache" $share /newroot/vscsi/$share \
            || echo "vscsi-dom0-initramfs: cannot mount share $share"
    fi
done
for fs in proc sys dev; do mount --move /$fs /newroot/$fs; done
exec switch_root /newroot /bin/sh /vscsi/run/dom0-init.sh
