#!/bin/bash
# Build the "real Xen inside QEMU" environment from Debian 12 packages:
#   OUT/xen                Xen 4.17 hypervisor (multiboot, gunzipped from xen-hypervisor-4.17-amd64)
#   OUT/vmlinuz            dom0 and domU kernel (Debian linux-image-amd64, PV-capable)
#   OUT/dom0-initrd.gz     busybox initramfs: loads virtio_pci + 9p, mounts the 9p shares, switch_root
#   OUT/domu-initrd.gz     base initramfs of the PV domU (xen-scsifront, sd_mod, sg, sg3-utils)
#   OUT/domu-fio.cpio.gz   fio layer, appended to the base for guests that run fio
#   OUT/rootfs ->          debootstrapped bookworm dom0 root (xen-utils-4.17, python3-trio, ...), a cache
#                          stage of its own: CACHE/xen-rootfs-<hash of its recipe>/rootfs
# OUT = ${VSCSI_CACHE:-$HOME/.cache/vscsi-bridge}/xen-<hash of the inputs>. Idempotent: a finished OUT
# (OUT/.complete) is reused. Progress lines go to stderr; the last stdout line is OUT.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../lib.sh
source "$HERE/../lib.sh"
CACHE=${VSCSI_CACHE:-$HOME/.cache/vscsi-bridge}
MIRROR=${VSCSI_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${VSCSI_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
INPUTS=("$HERE/build.sh" "$HERE/../lib.sh" "$HERE/dom0-initramfs-init.sh" "$HERE/domu-init.sh")
ROOTFS_PKGS="xen-utils-4.17 xenstore-utils python3 python3-trio python3-pyroute2 kmod busybox sg3-utils
      fio procps iproute2 util-linux cpio gzip xz-utils"
ROOTFS_REV=1   # bump when the rootfs recipe below changes
ROOTFS_HASH=$(echo "$ROOTFS_REV $ROOTFS_PKGS $MIRROR $SECURITY_MIRROR" | sha256sum | cut -c1-12)
ROOTFS_DIR=$CACHE/xen-rootfs-$ROOTFS_HASH
HASH=$( (cat "${INPUTS[@]}"; echo "$ROOTFS_HASH") | sha256sum | cut -c1-12)
OUT=$CACHE/xen-$HASH
T0=$SECONDS

say() { echo "[xen-build +$((SECONDS - T0))s] $*" >&2; }

if [ -f "$OUT/.complete" ] && command -v qemu-system-x86_64 >/dev/null 2>&1; then
    say "cached: $OUT"
    echo "$OUT"
    exit 0
fi

need() { command -v "$1" >/dev/null 2>&1; }
HOST_PKGS="debootstrap cpio busybox-static qemu-system-x86"
if ! need debootstrap || ! need cpio || ! need qemu-system-x86_64 || [ ! -x /bin/busybox ] \
    || ! /bin/busybox --list | grep -qx switch_root; then
    say "installing host tools ($HOST_PKGS)"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $HOST_PKGS >&2 \
        || { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends $HOST_PKGS >&2; }
fi

mkdir -p "$CACHE"
# One build at a time (parallel test sessions): the second waits, then finds the first's result.
exec 9>"$CACHE/xen-build.lock"
flock 9
if [ -f "$OUT/.complete" ]; then
    say "built meanwhile: $OUT"
    echo "$OUT"
    exit 0
fi
WORK=$(mktemp -d "$CACHE/xen-build.XXXXXX")
ROOT=$WORK/rootfs
cleanup() {
    for m in "$ROOT/proc" "$ROOT/dev"; do mountpoint -q "$m" 2>/dev/null && umount -l "$m"; done
    [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
in_root() { chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }

# ---- 1. dom0 root: debootstrapped bookworm (its own cache stage: slow, rarely changes) -------
if [ ! -f "$ROOTFS_DIR/.complete" ]; then
    say "debootstrap bookworm (minbase) into $ROOT"
    debootstrap --variant=minbase bookworm "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
    cat >"$ROOT/etc/apt/sources.list" <<SRC
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY_MIRROR bookworm-security main
SRC
    mount -t proc proc "$ROOT/proc"
    mount --rbind /dev "$ROOT/dev"
    say "apt-get update + dist-upgrade (tools must match the hypervisor: bookworm-security)"
    in_root apt-get update -q >"$WORK/apt.log" 2>&1 || { tail -20 "$WORK/apt.log" >&2; exit 1; }
    in_root apt-get -y -q dist-upgrade >>"$WORK/apt.log" 2>&1 || { tail -20 "$WORK/apt.log" >&2; exit 1; }
    say "apt-get install $(echo $ROOTFS_PKGS)"
    # shellcheck disable=SC2086
    in_root apt-get install -y -q --no-install-recommends $ROOTFS_PKGS >>"$WORK/apt.log" 2>&1 \
        || { tail -20 "$WORK/apt.log" >&2; exit 1; }
    # Kernel and hypervisor: unpacked, never installed (no initramfs hooks, no bootloader).
    KPKG=$(in_root apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    say "downloading $KPKG and xen-hypervisor-4.17-amd64"
    mkdir -p "$ROOT/tmp/debs"
    in_root sh -c "cd /tmp/debs && apt-get download -q $KPKG xen-hypervisor-4.17-amd64" >>"$WORK/apt.log" 2>&1 \
        || { tail -20 "$WORK/apt.log" >&2; exit 1; }
    # Extract aside, then copy: extracting into a merged-/usr root would replace the /lib symlink.
    mkdir -p "$WORK/kpkg"
    dpkg-deb -x "$ROOT"/tmp/debs/linux-image-*.deb "$WORK/kpkg"
    cp -a "$WORK/kpkg/boot/." "$ROOT/boot/"
    cp -a "$WORK/kpkg/lib/." "$ROOT/usr/lib/"
    rm -rf "$WORK/kpkg"
    mkdir -p "$ROOT/opt/vscsi/xen-hypervisor"
    dpkg-deb -x "$ROOT"/tmp/debs/xen-hypervisor-4.17-amd64_*.deb "$ROOT/opt/vscsi/xen-hypervisor"
    XENHV=$(dpkg-deb -f "$ROOT"/tmp/debs/xen-hypervisor-4.17-amd64_*.deb Version)
    rm -rf "$ROOT/tmp/debs"
    in_root apt-get clean
    KVER=$(ls "$ROOT/lib/modules" | head -1)
    # Debian's modules may be compressed; busybox insmod (initramfs) wants plain .ko files.
    find "$ROOT/lib/modules/$KVER" -name '*.ko.xz' -exec xz -d {} + 2>/dev/null || true
    in_root depmod "$KVER"
    # No udev in dom0, but never let a modalias autoload the kernel's vscsi backend: a userspace
    # backend owns vscsi devices unless a test loads xen-scsiback explicitly.
    echo "blacklist xen-scsiback" >"$ROOT/etc/modprobe.d/vscsi-bridge.conf"
    echo "dom0" >"$ROOT/etc/hostname"
    mkdir -p "$ROOT/vscsi/run" "$ROOT/vscsi/src" "$ROOT/vscsi/img" "$ROOT/var/lib/xenstored" "$ROOT/var/log/xen"
    cat >"$ROOT/opt/vscsi/versions" <<VER
kernel=$KVER
xen-utils=$(in_root dpkg-query -W -f '${Version}' xen-utils-4.17)
xen-hypervisor=$XENHV
python3=$(in_root python3 -c 'import sys; print(sys.version.split()[0])')
trio=$(in_root python3 -c 'import trio; print(trio.__version__)')
VER
    umount -l "$ROOT/proc" "$ROOT/dev"
    say "rootfs ready: $(tr '\n' ' ' <"$ROOT/opt/vscsi/versions")"
    rm -rf "$ROOTFS_DIR"
    mkdir -p "$ROOTFS_DIR"
    mv "$ROOT" "$ROOTFS_DIR/rootfs"
    touch "$ROOTFS_DIR/.complete"
else
    say "rootfs cached: $ROOTFS_DIR"
fi
ROOT=$ROOTFS_DIR/rootfs
KVER=$(sed -n 's/^kernel=//p' "$ROOT/opt/vscsi/versions")
mkdir -p "$WORK/out"

# ---- 2. dom0 initramfs: mounts the 9p root ---------------------------------------------------
# Modules and programs are copied with images/lib.sh (module_closure, copy_with_libs,
# extra_layer), the same code build-guest.sh uses, resolved in the dom0 rootfs.
MODDIR=$ROOT/lib/modules/$KVER
stage_initramfs() { # DIR INIT MODULES...: busybox, the modules in insmod order (lib/modules/order), /init
    local dir=$1 init=$2; shift 2
    mkdir -p "$dir"/{bin,sbin,dev,proc,sys,tmp,mnt,newroot,lib/modules}
    cp /bin/busybox "$dir/bin/busybox"
    for app in $(/bin/busybox --list); do [ "$app" = busybox ] || ln -sf busybox "$dir/bin/$app"; done
    local mods ko
    mods=$(module_closure "$MODDIR" "$@") || die "modules $* for $dir"
    : >"$dir/lib/modules/order"
    for ko in $mods; do
        cp "$ko" "$dir/lib/modules/"
        basename "$ko" >>"$dir/lib/modules/order"
    done
    install -m 0755 "$init" "$dir/init"
}
pack() { (cd "$1" && find . | cpio -o -H newc --quiet) | gzip -6 >"$2"; }

say "dom0 initramfs (virtio_pci, 9p)"
stage_initramfs "$WORK/dom0-initrd" "$HERE/dom0-initramfs-init.sh" virtio_pci 9pnet_virtio 9p
pack "$WORK/dom0-initrd" "$WORK/dom0-initrd.gz"

# ---- 3. domU base initramfs: xen-scsifront, sg3-utils, fio -----------------------------------
# Two archives: the base (busybox, modules, sg3-utils: about 3 MB, unpacks fast under TCG) and a
# fio layer (fio and its ~80 MB of libraries) appended only for guests that run fio: the kernel
# unpacks concatenated cpio archives in order.
say "domU initramfs (xen-scsifront, sd_mod, sg, sg3-utils) + fio layer"
D=$WORK/domu-initrd
stage_initramfs "$D" "$HERE/domu-init.sh" xen-scsifront sd_mod sg
mapfile -t SG_TOOLS < <(cd "$ROOT/usr/bin" && ls sg_* sginfo | sed 's#^#/usr/bin/#')
copy_with_libs "$ROOT" "$D" "${SG_TOOLS[@]}"
pack "$D" "$WORK/out/domu-initrd.gz"
extra_layer "$D" "$WORK/domu-fio.cpio" "$ROOT" /usr/bin/fio
gzip -6 <"$WORK/domu-fio.cpio" >"$WORK/out/domu-fio.cpio.gz"

# ---- 4. Python libraries for the bridge in dom0 (bookworm's python3-trio 0.22 is older than
# pyproject's trio>=0.24): pure-Python wheels, PYTHONPATH=/vscsi/img/pylib in dom0.
TRIO_VERSION=0.35.0
say "pylib: trio==$TRIO_VERSION (pip --target)"
PIP_PY=
for py in "${VSCSI_PYTHON:-}" python3; do
    [ -n "$py" ] && "$py" -m pip --version >/dev/null 2>&1 && { PIP_PY=$py; break; }
done
PIP_EXTRA=
if [ -z "$PIP_PY" ]; then
    say "installing python3-pip on the host (no python with pip found; or set VSCSI_PYTHON)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-pip >&2
    PIP_PY=python3
fi
# Debian's own python3 is "externally managed" (PEP 668) even for --target installs.
[ -f "$("$PIP_PY" -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')/EXTERNALLY-MANAGED" ] \
    && PIP_EXTRA=--break-system-packages
# shellcheck disable=SC2086
"$PIP_PY" -m pip install -q --disable-pip-version-check --no-compile --target "$WORK/out/pylib" \
    --python-version 3.11 --only-binary=:all: $PIP_EXTRA "trio==$TRIO_VERSION" >&2

# ---- 5. the hypervisor and the kernel ------------------------------------------------------
gunzip -c "$ROOT"/opt/vscsi/xen-hypervisor/boot/xen-4.17-amd64.gz >"$WORK/out/xen"
cp "$ROOT/boot/vmlinuz-$KVER" "$WORK/out/vmlinuz"
mv "$WORK/dom0-initrd.gz" "$WORK/out/"
cp "$ROOT/opt/vscsi/versions" "$WORK/out/versions"
echo "rootfs=$ROOT" >>"$WORK/out/versions"
echo "domu-initrd-bytes=$(stat -c %s "$WORK/out/domu-initrd.gz")" >>"$WORK/out/versions"
echo "domu-fio-layer-bytes=$(stat -c %s "$WORK/out/domu-fio.cpio.gz")" >>"$WORK/out/versions"
ln -s "$ROOT" "$WORK/out/rootfs"
rm -rf "$OUT"
mv "$WORK/out" "$OUT"
touch "$OUT/.complete"
say "done: $OUT"
echo "$OUT"
