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
