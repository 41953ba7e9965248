#!/usr/bin/env bash
# Build the test guest from Debian 12 packages: a kernel and an initramfs.
#
#   vmlinux             uncompressed kernel (PVH entry: boots about 2x faster under TCG)
#   vmlinuz             the packaged bzImage (fallback)
#   initramfs.cpio.gz   busybox-static, modules, sg3-utils, e2fsprogs, iscsi-test-cu,
#                       /init from images/guest/init
#   fio.cpio            fio and the libraries only it needs (about 80 MB), and the
#                       multipath tools (multipath, multipathd, udevd, dmsetup, their
#                       plugins and udev rules), appended to the initramfs only by runs
#                       that use fio (or ask for the layer); left uncompressed
#                       because inflating it in the emulated guest cost more boot time
#                       under TCG than QEMU copying the raw bytes
#
# The kernel package is downloaded and unpacked (never installed on the host); the
# userland tools are installed on the host with apt-get and copied with the
# libraries ldd lists. Output (stdout): the directory holding the files above.
# Cache: $VSCSI_CACHE/guest-<hash>/, keyed by this script, images/lib.sh,
# images/guest/*, the module lists and the candidate versions of the packages.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

HOST_TOOLS=(busybox-static cpio kmod xz-utils gzip)
USER_PACKAGES=(busybox-static sg3-utils e2fsprogs libiscsi-bin fio multipath-tools udev dmsetup)
# Modules loaded at boot (with their dependencies, resolved by modinfo).
MODULES=(virtio virtio_ring virtio_pci virtio_scsi scsi_mod scsi_common sd_mod sg
         t10-pi crc-t10dif crct10dif_generic crct10dif-pclmul crc64-rocksoft crc64 crc64_rocksoft_generic
         ext4 jbd2 mbcache crc16 crc32c_generic crc32c-intel libcrc32c)
# Copied too, loaded only in a Xen domU.
XEN_MODULES=(xen-scsifront)
# Copied too, loaded by runs that ask (vscsi.modules=...): dm-multipath and the ALUA
# device handler for multipath guests (tests/integration/test_alua_multipath_booted.py).
MPATH_MODULES=(dm-multipath dm-round-robin dm-service-time dm-queue-length scsi_dh_alua)
# The multipath userland of the extra layer: programs, dlopen'd plugins, udev rules.
MPATH_FILES=(/sbin/multipath /sbin/multipathd /sbin/mpathpersist /sbin/dmsetup /bin/udevadm
             /lib/systemd/systemd-udevd /lib/udev/scsi_id /lib/udev/ata_id)
MPATH_RULES=(50-udev-default 55-dm 56-dm-mpath 60-block 60-persistent-storage
             60-persistent-storage-dm 60-multipath 95-dm-notify)
STEPS=7

ensure_host_pkgs "${HOST_TOOLS[@]}" "${USER_PACKAGES[@]}"

# The kernel: linux-image-amd64 depends on exactly one linux-image-<abi>-amd64.
kernel_package() {
    local pkg
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null \
          | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    if [[ -z "$pkg" ]]; then
        apt_update_once
        pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    fi
    [[ -n "$pkg" ]] || die "cannot resolve linux-image-amd64"
    echo "$pkg"
}
KPKG=$(kernel_package)
# One apt-cache call for all candidate versions ("pkg=version" lines).
mapfile -t VERSIONS < <(apt-cache policy "$KPKG" "${USER_PACKAGES[@]}" \
    | awk '/^[^ ].*:$/ {p = substr($0, 1, length($0) - 1)} /Candidate:/ {print p "=" $2}')
(( ${#VERSIONS[@]} == 1 + ${#USER_PACKAGES[@]} )) || die "apt-cache policy: ${VERSIONS[*]}"
candidate() { printf '%s\n' "${VERSIONS[@]}" | awk -F= -v p="$1" '$1 == p {print $2}'; }

HASH=$(input_hash "${BASH_SOURCE[0]}" "$IMAGES_DIR/lib.sh" "$IMAGES_DIR"/guest/* -- \
       "${VERSIONS[@]}" "${MODULES[@]}" "${XEN_MODULES[@]}" "${MPATH_MODULES[@]}")
OUT="$VSCSI_CACHE/guest-$HASH"

# Programs, their libraries and modules are copied with lib.sh's copy_with_libs,
# module_closure and extra_layer (shared with xen/build.sh).

build() {
    if [[ -f "$OUT/.complete" ]]; then
        progress "1/$STEPS" "guest cached at $OUT (cache hit)"
        return
    fi
    local tmp="$OUT.tmp.$$"
    rm -rf "$OUT".tmp.*
    mkdir -p "$tmp"
    trap "rm -rf '$tmp'" EXIT

    progress "1/$STEPS" "downloading $KPKG"
    mkdir -p "$VSCSI_CACHE/debs" "$tmp/kernel"
    local deb
    deb=$(ls "$VSCSI_CACHE/debs/${KPKG}_"*.deb 2>/dev/null | head -n1 || true)
    if [[ -z "$deb" || "$deb" != *"_$(candidate "$KPKG" | sed 's/:/%3a/')_"* ]]; then
        (cd "$VSCSI_CACHE/debs" && apt-get download -q "$KPKG" 2>&1 | grep -v unsandboxed >&2 || true)
        deb=$(ls -t "$VSCSI_CACHE/debs/${KPKG}_"*.deb | head -n1)
    fi
    [[ -f "$deb" ]] || die "apt-get download $KPKG failed"
    dpkg-deb -x "$deb" "$tmp/kernel"
    local kver
    kver=$(ls "$tmp/kernel/lib/modules")
    local moddir="$tmp/kernel/lib/modules/$kver"

    progress "2/$STEPS" "extracting vmlinux from vmlinuz-$kver"
    cp "$tmp/kernel/boot/vmlinuz-$kver" "$tmp/vmlinuz"
    extract_vmlinux "$tmp/vmlinuz" "$tmp/vmlinux"

    progress "3/$STEPS" "collecting modules"
    local root="$tmp/root"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/vscsi,lib/vscsi,proc,sys,dev,tmp,run,mnt,root}
    local f rel mods
    mods=$(module_closure "$moddir" "${MODULES[@]}" "${XEN_MODULES[@]}" "${MPATH_MODULES[@]}") || die "modules"
    for f in $(sort -u <<<"$mods"); do
        rel=${f#"$tmp/kernel"}
        install -D -m 644 "$f" "$root$rel"
    done
    cp "$moddir"/modules.{order,builtin,builtin.modinfo} "$root/lib/modules/$kver/" 2>/dev/null || true
    depmod -b "$root" "$kver"
    printf '%s\n' "${MODULES[@]}" >"$root/etc/vscsi/modules"
    printf '%s\n' "${XEN_MODULES[@]}" >"$root/etc/vscsi/modules.xen"

    progress "4/$STEPS" "copying busybox, sg3-utils, e2fsprogs, iscsi-test-cu and libraries"
    install -m 755 /bin/busybox "$root/bin/busybox"
    local applet
    for applet in $(/bin/busybox --list); do
        [[ -e "$root/bin/$applet" ]] || ln -s busybox "$root/bin/$applet"
    done
    local tools=()
    mapfile -t tools < <(dpkg -L sg3-utils | grep -E '^/usr/bin/[^/]+$')
    tools+=(/usr/bin/iscsi-test-cu)
    for f in mke2fs mkfs.ext4 e2fsck fsck.ext4 tune2fs dumpe2fs resize2fs debugfs; do
        tools+=("$(command -v "$f" || echo "/sbin/$f")")
    done
    copy_with_libs / "$root" "${tools[@]}"
    [[ -f /etc/mke2fs.conf ]] && install -D -m 644 /etc/mke2fs.conf "$root/etc/mke2fs.conf"
    install -m 755 "$IMAGES_DIR/guest/init" "$root/init"
    install -m 644 "$IMAGES_DIR/guest/helpers.sh" "$root/lib/vscsi/helpers.sh"
    echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
    echo "root:x:0:" >"$root/etc/group"
    printf '%s\n' "${VERSIONS[@]}" >"$root/etc/vscsi/versions"

    progress "5/$STEPS" "packing initramfs.cpio.gz"
    (cd "$root" && find . -print0 | LC_ALL=C sort -z \
        | cpio --null -o -H newc --quiet --owner=0:0 | gzip -6 -n) >"$tmp/initramfs.cpio.gz"

    progress "6/$STEPS" "packing fio.cpio (fio, multipath tools and the libraries the base lacks)"
    # Libraries already in the base are left out of the fio layer.
    local mpath=("${MPATH_FILES[@]}") r
    mpath+=(/lib/multipath/*.so)
    for r in "${MPATH_RULES[@]}"; do mpath+=("/lib/udev/rules.d/$r.rules"); done
    extra_layer "$root" "$tmp/fio.cpio" / /usr/bin/fio "${mpath[@]}"

    progress "7/$STEPS" "done: $(du -h "$tmp/initramfs.cpio.gz" | cut -f1) initramfs, $(du -h "$tmp/fio.cpio" | cut -f1) fio layer"
    printf '%s\n' "${VERSIONS[@]}" >"$tmp/versions.txt"
    echo "$kver" >"$tmp/kernel-release"
    rm -rf "$tmp/kernel"
    mv "$tmp/root" "$tmp/initramfs-root"
    touch "$tmp/.complete"
    rm -rf "$OUT"
    mv "$tmp" "$OUT"
    trap - EXIT
    prune_other_entries guest "$OUT"
}

# extract_vmlinux BZIMAGE OUT: the ELF kernel inside the bzImage's compressed
# payload (Debian compresses with xz; gzip and zstd are tried too). Each
# occurrence of a magic is tried until one decompresses to an ELF file.
extract_vmlinux() {
    local in=$1 out=$2 off pair magic cmd
    for pair in '\xfd7zXZ\x00:xz -dc --single-stream' '\x1f\x8b\x08\x00:gzip -dc' \
                '\x28\xb5\x2f\xfd:zstd -dc'; do
        magic=${pair%%:*} cmd=${pair#*:}
        for off in $(LC_ALL=C grep -obUaP "$magic" "$in" | cut -d: -f1); do
            tail -c +$((off + 1)) "$in" | $cmd >"$out" 2>/dev/null || true
            if [[ "$(head -c 4 "$out" | od -An -tx1 | tr -d ' ')" == "7f454c46" ]]; then
                return 0
            fi
        done
    done
    rm -f "$out"
    echo "[images] warning: could not extract vmlinux; the harness will boot vmlinuz" >&2
}

with_lock "guest" build
echo "$OUT"
