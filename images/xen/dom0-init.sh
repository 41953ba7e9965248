#!/bin/sh
# dom0 PID 1 (after the initramfs switch_root). Copied into the run directory by
# harness/xen.py at every run, so editing it never rebuilds the image.
# Brings up the Xen toolstack daemons, runs /vscsi/run/test.sh (with lib.sh sourced) and reports
# its exit status on the console between markers, then powers the machine off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
export LC_ALL=C PYTHONDONTWRITEBYTECODE=1 HOME=/root PYTHONPATH=/vscsi/img/pylib
say() { echo "vscsi-dom0: $*"; }

# The root share is read-only (several runs may share one image): everything written goes to tmpfs.
for d in /run /tmp /var/lib/xenstored /var/lib/xen /var/log /var/tmp /root; do
    mount -t tmpfs -o mode=0755 tmpfs "$d" || say "cannot mount tmpfs on $d"
done
chmod 1777 /tmp /var/tmp
mkdir -p /run/xen /run/xenstored /run/lock /var/log/xen /var/lib/xen/dump /vscsi/run/console
mount -t xenfs xenfs /proc/xen
mount -t configfs configfs /sys/kernel/config 2>/dev/null
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd; do modprobe "$m" || say "modprobe $m failed"; done

XENSTORED=
for c in /usr/lib/xen-4.17/bin/xenstored /usr/sbin/xenstored /usr/lib/xen-4.17/bin/oxenstored; do
    [ -x "$c" ] && { XENSTORED=$c; break; }
done
say "starting $XENSTORED"
"$XENSTORED" --pid-file=/run/xenstored.pid || say "xenstored failed"
i=0; while [ ! -S /run/xenstored/socket ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
xen-init-dom0 || say "xen-init-dom0 failed"
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/vscsi/run/console \
    || say "xenconsoled failed"
echo "VSCSI-XEN-DOM0-READY"

cd /tmp
echo "VSCSI-XEN-DOM0-SCRIPT-BEGIN"
sh -c '. /vscsi/run/lib.sh && . /vscsi/run/test.sh' </dev/null 2>&1
rc=$?
echo "VSCSI-XEN-DOM0-SCRIPT-END"
echo "VSCSI-XEN-DOM0-RC=$rc"
echo "$rc" >/vscsi/run/dom0-rc

# Let domains still alive flush their consoles, then stop them.
for d in $(xl list 2>/dev/null | awk 'NR > 2 {print $2}'); do xl destroy "$d" 2>/dev/null; done
sync
say "powering off"
echo o >/proc/sysrq-trigger
sleep 5
busybox poweroff -f
