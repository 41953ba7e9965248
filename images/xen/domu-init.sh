#!/bin/sh
# PV domU /init: load xen-scsifront + sd_mod + sg, run /guest.sh (added to the initramfs per run as a
# second cpio archive), report its exit status on the console, power off.
export PATH=/usr/bin:/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp && mount -t tmpfs tmpfs /tmp
for m in $(cat /lib/modules/order); do
    # qemu64 has no PCLMULQDQ: the accelerated crc module refuses to load, the generic one serves.
    [ "$m" = crct10dif-pclmul.ko ] && continue
    insmod "/lib/modules/$m" 2>/dev/null || grep -q "^$(echo "${m%.ko}" | tr - _) " /proc/modules \
        || echo "vscsi-domu: insmod $m failed"
done
echo "VSCSI-DOMU-BOOTED"
if [ -f /guest.sh ]; then
    sh /guest.sh
    rc=$?
else
    echo "vscsi-domu: no /guest.sh"; rc=127
fi
echo "VSCSI-DOMU-RC=$rc"
sync
poweroff -f
