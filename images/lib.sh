# Shared helpers for the images/ build scripts. Sourced, not run.
# Every build script keys its cache directory by input_hash over its own text,
# this file's text and its package list, so it rebuilds only when those change.

VSCSI_CACHE="${VSCSI_CACHE:-$HOME/.cache/vscsi-bridge}"
IMAGES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
_APT_UPDATED=0

# progress "N/M" "text": one line per build step, on stderr so stdout stays
# machine-readable (scripts print their result paths on stdout).
progress() {
    echo "[images] step $1: $2" >&2
}

die() {
    echo "[images] error: $*" >&2
    exit 1
}

# input_hash FILE... -- STRING...: short sha256 over files' contents and strings.
input_hash() {
    local files=() strings=() seen_sep=0 a
    for a in "$@"; do
        if [[ "$a" == "--" ]]; then seen_sep=1; continue; fi
        if (( seen_sep )); then strings+=("$a"); else files+=("$a"); fi
    done
    { cat "${files[@]}"; printf '%s\n' "${strings[@]}"; } | sha256sum | cut -c1-16
}

apt_update_once() {
    if (( _APT_UPDATED == 0 )); then
        echo "[images] apt-get update" >&2
        apt-get update -qq >&2 || die "apt-get update failed"
        _APT_UPDATED=1
    fi
}

# ensure_host_pkgs PKG...: install missing host prerequisites with apt-get.
ensure_host_pkgs() {
    local missing=() p installed
    # dpkg-query exits non-zero when some package is unknown: that is the point.
    installed=" $({ dpkg-query -W -f='${Package}:${Status}\n' "$@" 2>/dev/null || true; } \
                 | awk -F: '/install ok installed/ {printf "%s ", $1}')"
    for p in "$@"; do
        [[ "$installed" == *" $p "* ]] || missing+=("$p")
    done
    if (( ${#missing[@]} )); then
        [[ $(id -u) -eq 0 ]] || die "need root to apt-get install ${missing[*]}"
        apt_update_once
        echo "[images] apt-get install ${missing[*]}" >&2
        mkdir -p "$VSCSI_CACHE"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >"$VSCSI_CACHE/apt-install.log" 2>&1 \
            || { tail -n 30 "$VSCSI_CACHE/apt-install.log" >&2; die "apt-get install failed"; }
    fi
}

# _apt_uris: every archive URI in the host's apt sources (one-line and deb822).
_apt_uris() {
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | sed -E 's/\[[^]]*\]//' | awk '$1 == "deb" {print $2}'
    cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk 'tolower($1) == "uris:" {for (i = 2; i <= NF; i++) print $i}'
}

# debian_mirror: the Debian archive URI the host's apt already uses, so no
# mirror is hard-coded here. VSCSI_DEBIAN_MIRROR overrides it.
debian_mirror() {
    if [[ -n "${VSCSI_DEBIAN_MIRROR:-}" ]]; then echo "$VSCSI_DEBIAN_MIRROR"; return; fi
    local uri
    uri=$(_apt_uris | grep -i debian | grep -v -- '-security' | head -n1)
    [[ -n "$uri" ]] || die "no Debian mirror in the host's apt sources; set VSCSI_DEBIAN_MIRROR"
    echo "${uri%/}"
}

# debian_security_mirror: the same for the security archive.
debian_security_mirror() {
    if [[ -n "${VSCSI_DEBIAN_SECURITY_MIRROR:-}" ]]; then
        echo "$VSCSI_DEBIAN_SECURITY_MIRROR"; return
    fi
    local uri
    uri=$(_apt_uris | grep -- '-security' | head -n1)
    [[ -n "$uri" ]] || uri="$(debian_mirror)-security"
    echo "${uri%/}"
}

# with_lock NAME CMD...: serialise builds of one cache entry across processes
# (several engineers / test sessions may run the same script at once).
with_lock() {
    local name=$1; shift
    mkdir -p "$VSCSI_CACHE"
    exec {lockfd}>"$VSCSI_CACHE/$name.lock"
    flock "$lockfd"
    "$@"
    local rc=$?
    flock -u "$lockfd"
    exec {lockfd}>&-
    return $rc
}

# prune_other_entries PREFIX CURRENT: remove older cache entries PREFIX-* other
# than CURRENT (run under the entry's lock, after CURRENT is complete). Files a
# running QEMU already opened stay readable until it exits.
prune_other_entries() {
    local prefix=$1 current=$2 d
    for d in "$VSCSI_CACHE/$prefix"-*; do
        [[ -d "$d" && "$d" != "$current" && "$d" != *.tmp.* ]] || continue
        # Still mapped by a running process (a QEMU from that tree): keep it.
        if grep -qsF "$d/" /proc/[0-9]*/maps; then continue; fi
        echo "[images] removing old cache entry $d" >&2
        rm -rf "$d"
    done
}

# ---- copying programs and modules into an initramfs (build-guest.sh, xen/build.sh) ----------

# _ldd FROM FILE: ldd of FILE as the system rooted at FROM sees it ("/" is the host).
_ldd() {
    if [[ "$1" == / ]]; then ldd "$2" 2>/dev/null; else chroot "$1" ldd "$2" 2>/dev/null; fi
}

# copy_with_libs FROM TO FILE...: FILE (an absolute path in the system rooted at FROM, "/"
# for the host) and every library its ldd lists (the loader included), copied to the same
# paths under TO. Libraries TO already has are not copied again.
copy_with_libs() {
    local from=${1%/} to=$2; shift 2
    local f lib
    for f in "$@"; do
        install -D -m 755 "$from$f" "$to$f"
        while read -r lib; do
            [[ -e "$to$lib" ]] || install -D -m 755 "$(readlink -f "$from$lib")" "$to$lib"
        done < <(_ldd "${from:-/}" "$f" | grep -Eo '/[^ ]+\.so[^ ]*' | sort -u)
    done
}

# extra_layer BASE OUT FROM FILE...: an uncompressed cpio at OUT holding FILE (from the system
# rooted at FROM) and the libraries it needs that the initramfs tree BASE lacks: appended to
# BASE's archive only by runs that need FILE (the kernel unpacks concatenated archives).
extra_layer() {
    local base=$1 out=$2 from=$3; shift 3
    local tmp
    tmp=$(mktemp -d)
    cp -a "$base" "$tmp/all"
    copy_with_libs "$from" "$tmp/all" "$@"
    (cd "$tmp/all" && find . -mindepth 1 -print) | LC_ALL=C sort >"$tmp/all.lst"
    (cd "$base" && find . -mindepth 1 -print) | LC_ALL=C sort >"$tmp/base.lst"
    comm -23 "$tmp/all.lst" "$tmp/base.lst" >"$tmp/extra.lst"
    (cd "$tmp/all" && cpio -o -H newc --quiet --owner=0:0 <"$tmp/extra.lst") >"$out"
    rm -rf "$tmp"
}

# module_closure MODDIR NAME...: the .ko files of the modules NAME... and of everything they
# need (modinfo depends, and softdep "pre:" modules or aliases where they exist), each once,
# dependencies first: an insmod order (what `modprobe --show-depends` lists). Modules built into the kernel (modules.builtin) are skipped; a
# module that is neither there nor built in is fatal.
module_closure() {
    local moddir=$1; shift
    local -A _mc_seen=()
    local m
    for m in "$@"; do _module_visit "$moddir" "$m" required; done
}

_module_visit() {
    local moddir=$1 m=${2//-/_} need=$3 f dep
    [[ -n "${_mc_seen[$m]:-}" ]] && return 0
    _mc_seen[$m]=1
    f=$(find "$moddir/kernel" \( -name "$m.ko" -o -name "${m//_/-}.ko" \) -print -quit)
    if [[ -z "$f" ]]; then
        grep -qE "/(${m}|${m//_/-})\.ko$" "$moddir/modules.builtin" && return 0
        # A name no module file has may be an alias (softdep "pre: crct10dif" names the
        # implementations of an algorithm): every module the alias stands for, as modprobe does.
        local targets
        targets=$(awk -v a="$2" '$1 == "alias" && $2 == a {print $3}' "$moddir/modules.alias" 2>/dev/null)
        if [[ -n "$targets" ]]; then
            for dep in $targets; do _module_visit "$moddir" "$dep" soft; done
            return 0
        fi
        [[ "$need" == required ]] && die "module $m not found in $moddir"
        return 0  # a soft dependency this kernel does not have
    fi
    for dep in $(modinfo -F depends "$f" | tr , ' '); do _module_visit "$moddir" "$dep" required; done
    for dep in $(modinfo -F softdep "$f" | sed -n 's/.*pre: *\([^:]*\)\( post:.*\)\{0,1\}$/\1/p'); do
        _module_visit "$moddir" "$dep" soft
    done
    echo "$f"
}
