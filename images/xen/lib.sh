# Shell helpers for dom0 test scripts (sourced before /vscsi/run/test.sh). POSIX sh.
# Copied into the run directory by harness/xen.py at every run.
#   /vscsi/img   the built image (vmlinuz, domu-initrd.gz), read-only
#   /vscsi/src   the checkout under test, read-only (python3 -m bridge... from there)
#   /vscsi/run   this run's directory, shared with the host (results go here)

VSCSI_IMG=/vscsi/img
VSCSI_SRC=/vscsi/src
VSCSI_RUN=/vscsi/run

# domu_initrd GUEST_SCRIPT OUT: the base domU initramfs, the fio layer if DOMU_FIO=1 (about 80 MB
# unpacked: the domU then needs 512 MB and boots ~10 s slower under TCG), and a last cpio archive
# holding GUEST_SCRIPT as /guest.sh (the kernel unpacks concatenated archives in order).
domu_initrd() {
    _d=$(mktemp -d)
    cp "$1" "$_d/guest.sh"
    (cd "$_d" && echo guest.sh | cpio -o -H newc --quiet | gzip -1) >"$_d/extra.gz"
    _layers="$VSCSI_IMG/domu-initrd.gz"
    [ "${DOMU_FIO:-0}" = 1 ] && _layers="$_layers $VSCSI_IMG/domu-fio.cpio.gz"
    # shellcheck disable=SC2086
    cat $_layers "$_d/extra.gz" >"$2"
    rm -rf "$_d"
}

# domu_create NAME GUEST_SCRIPT [MEMORY_MB] [EXTRA_KERNEL_ARGS]: create a paused PV domU that runs
# GUEST_SCRIPT (memory default 256, 512 with DOMU_FIO=1). Prints its domid. Its console is logged to /vscsi/run/console/guest-NAME.log.
domu_create() {
    _name=$1 _script=$2 _mem=${3:-} _extra=${4:-}
    [ -n "$_mem" ] || { _mem=256; [ "${DOMU_FIO:-0}" = 1 ] && _mem=512; }
    domu_initrd "$_script" "/tmp/$_name-initrd.gz"
    cat >"/tmp/$_name.cfg" <<CFG
name = "$_name"
type = "pv"
kernel = "$VSCSI_IMG/vmlinuz"
ramdisk = "/tmp/$_name-initrd.gz"
extra = "console=hvc0 loglevel=5 $_extra"
memory = $_mem
vcpus = 1
on_poweroff = "destroy"
on_reboot = "restart"
on_crash = "destroy"
CFG
    xl create -p "/tmp/$_name.cfg" >/tmp/"$_name".xl.log 2>&1 || { cat /tmp/"$_name".xl.log; return 1; }
    xl domid "$_name"
}

# vscsi_write_nodes DOMID DEVID PDEV VDEV [PDEV VDEV ...]: the toolstack part xl 4.17 lacks.
# Frontend /local/domain/DOMID/device/vscsi/DEVID (owned by the domU, readable by dom0) and backend
# /local/domain/0/backend/vscsi/DOMID/DEVID (owned by dom0, readable by the domU), one dev-N per
# PDEV/VDEV pair. Works before `xl unpause` and while the domU runs (hotplug), without transactions
# (xenstore-utils has none), by the order of the writes: xenbus probes a device only once its own
# `state` node reads Initialising (1), and children inherit their directory's permissions, so
#   1. frontend dir (backend, backend-id) + permissions, 2. backend dir + permissions,
#   3. frontend state=1 (a running frontend probes now: everything it reads is there and readable),
#   4. backend state=1 (the backend probes; it checks that the frontend dir exists).
vscsi_write_nodes() {
    _dom=$1 _dev=$2; shift 2
    _fe=/local/domain/$_dom/device/vscsi/$_dev
    _be=/local/domain/0/backend/vscsi/$_dom/$_dev
    xenstore-write "$_fe/backend" "$_be" "$_fe/backend-id" 0
    xenstore-chmod -r "$_fe" "n$_dom" r0
    xenstore-write "$_be/frontend" "$_fe" "$_be/frontend-id" "$_dom" "$_be/online" 1 \
        "$_be/feature-host" 0
    xenstore-chmod -r "$_be" n0 "r$_dom"
    _n=0
    while [ $# -ge 2 ]; do
        xenstore-write "$_be/vscsi-devs/dev-$_n/p-dev" "$1" "$_be/vscsi-devs/dev-$_n/v-dev" "$2" \
            "$_be/vscsi-devs/dev-$_n/state" 1
        _n=$((_n + 1)); shift 2
    done
    xenstore-write "$_fe/state" 1
    xenstore-write "$_be/state" 1
}

# vscsi_remove_nodes DOMID DEVID: remove both directories (backends leave theirs at state 6).
vscsi_remove_nodes() {
    xenstore-rm "/local/domain/$1/device/vscsi/$2" 2>/dev/null
    xenstore-rm "/local/domain/0/backend/vscsi/$1/$2" 2>/dev/null
    xenstore-rm "/local/domain/0/backend/vscsi/$1" 2>/dev/null
    return 0
}

# domu_wait_gone NAME TIMEOUT_S: wait until the domain no longer exists (it powered off).
domu_wait_gone() {
    _i=0
    while xl domid "$1" >/dev/null 2>&1; do
        _i=$((_i + 1))
        [ $_i -gt $(($2 * 2)) ] && { echo "vscsi-dom0: $1 still running after $2 s"; return 1; }
        sleep 0.5
    done
}

# domu_wait_booted NAME TIMEOUT_S: wait until the domU's init has loaded its modules (it prints
# VSCSI-DOMU-BOOTED). Writing the vscsi nodes only then saves ~30 s per domU: a PV kernel waits up
# to 30 s at boot (xenbus_probe_frontend "Waiting for devices to initialise") for every device
# present whose driver is not loaded yet, and xen-scsifront is a module loaded by the initramfs.
domu_wait_booted() {
    _i=0
    until domu_console "$1" | grep -q VSCSI-DOMU-BOOTED; do
        _i=$((_i + 1))
        [ $_i -gt $(($2 * 5)) ] && { echo "vscsi-dom0: $1 did not boot in $2 s"; return 1; }
        xl domid "$1" >/dev/null 2>&1 || { echo "vscsi-dom0: $1 is gone"; return 1; }
        sleep 0.2
    done
}

# domu_console NAME: what the domU printed on its console so far.
domu_console() { cat "$VSCSI_RUN/console/guest-$1.log" 2>/dev/null; }

# domu_rc NAME: the exit status the domU's /guest.sh reported (empty if none).
domu_rc() { domu_console "$1" | tr -d '\r' | sed -n 's/^VSCSI-DOMU-RC=//p' | tail -1; }

# xs_dump PATH: the xenstore subtree under PATH with values (for logs).
xs_dump() { xenstore-ls -f "$1" 2>/dev/null; }

# lio_fileio_pvscsi IMAGE SIZE_BYTES WWN LUN: Linux's reference backend: xen-scsiback + LIO with a
# fileio backstore on IMAGE, a xen-pvscsi target port WWN (naa.*), tpg 1, LUN, and its I_T nexus.
# The matching p-dev is "WWN:LUN".
lio_fileio_pvscsi() {
    _img=$1 _size=$2 _wwn=$3 _lun=$4
    modprobe -a target_core_mod target_core_file xen-scsiback || return 1
    mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config
    _t=/sys/kernel/config/target
    _bs=$_t/core/fileio_0/vscsi_disk$_lun
    mkdir -p "$_bs" || return 1
    echo "fd_dev_name=$_img,fd_dev_size=$_size" >"$_bs/control" || return 1
    echo 1 >"$_bs/enable" || return 1
    _tpg=$_t/xen-pvscsi/$_wwn/tpgt_1
    mkdir -p "$_tpg/lun/lun_$_lun" || return 1
    ln -s "$_bs" "$_tpg/lun/lun_$_lun/vscsi_port" || return 1
    [ -n "$(cat "$_tpg/nexus" 2>/dev/null)" ] || echo "${_wwn%?}f" >"$_tpg/nexus" || return 1
}

# ---- the bridge (from the checkout /vscsi/src), through its own command line --------------
# `python3 -m bridge.cli` run in /vscsi/src: the same serve path as `vscsi-bridge serve`
# (SIGUSR1 dumps Python stacks, SIGUSR2 each backend's ring state into the log).
bridge_cli() {
    (cd "${VSCSI_SRC:-/vscsi/src}" && exec python3 -m bridge.cli "$@")
}

# bridge_attach DOMID DEVID LUN...: the bridge's own toolstack code writes the nodes
# (`vscsi-bridge xen attach`; the guest sees LUN L as v-dev 0:0:L/256:L%256).
bridge_attach() {
    _dom=$1 _dev=$2; shift 2
    _a=""
    for _l in "$@"; do _a="$_a --lun $_l"; done
    # shellcheck disable=SC2086
    bridge_cli xen attach --domid "$_dom" --devid "$_dev" $_a
}

# bridge_start LOG DOMAIN_NAME IMAGE SIZE [--grant-strategy auto|map|copy] [--lun L]...: write a
# configuration (one LU "disk0" on IMAGE, its LUNs for DOMAIN_NAME's vscsi device 0, default
# LUN 0) and start `serve` in the background (its pid in BRIDGE_PID); wait until it watches
# xenstore (30 s at most). BRIDGE_PYTHON_OPTS: e.g. "-m cProfile -o /vscsi/run/bridge.prof".
bridge_start() {
    _log=$1 _name=$2 _img=$3 _size=$4; shift 4
    _strategy=auto _luns=""
    while [ $# -gt 0 ]; do
        case $1 in
            --grant-strategy) _strategy=$2; shift 2 ;;
            --lun) _luns="$_luns${_luns:+, }$2 = \"disk0\""; shift 2 ;;
            *) echo "vscsi-dom0: bridge_start: unknown option $1"; return 1 ;;
        esac
    done
    _cfg=/tmp/bridge-$_name.toml
    {
        echo "[bridge]"
        echo "state_dir = \"/tmp/bridge-$_name\""
        echo "log_level = \"${BRIDGE_LOG_LEVEL:-info}\""
        echo "xen_grant_strategy = \"$_strategy\""
        echo "[[lu]]"
        echo "name = \"disk0\""
        echo "path = \"$_img\""
        echo "size = $_size"
        echo "[[xen]]"
        echo "domain = \"$_name\""
        echo "devid = 0"
        echo "luns = { ${_luns:-0 = \"disk0\"} }"
    } >"$_cfg"
    rm -f /tmp/bridge.ready
    # A subshell that execs python: $! is the bridge itself, so bridge_stop's SIGTERM reaches it.
    # shellcheck disable=SC2086
    (cd "${VSCSI_SRC:-/vscsi/src}" && exec python3 ${BRIDGE_PYTHON_OPTS:-} -m bridge.cli serve \
        --config "$_cfg" --ready-file /tmp/bridge.ready) >"$_log" 2>&1 &
    BRIDGE_PID=$!
    _i=0
    while [ ! -f /tmp/bridge.ready ]; do
        _i=$((_i + 1))
        if [ $_i -gt 300 ] || ! kill -0 "$BRIDGE_PID" 2>/dev/null; then
            echo "vscsi-dom0: the bridge did not start"; cat "$_log"; return 1
        fi
        sleep 0.1
    done
}

# bridge_stop: SIGTERM the backend started by bridge_start, wait for it (10 s), then SIGKILL.
bridge_stop() {
    [ -n "${BRIDGE_PID:-}" ] || return 0
    kill -TERM "$BRIDGE_PID" 2>/dev/null
    _i=0
    while kill -0 "$BRIDGE_PID" 2>/dev/null && [ $_i -lt 100 ]; do sleep 0.1; _i=$((_i + 1)); done
    kill -KILL "$BRIDGE_PID" 2>/dev/null
    wait "$BRIDGE_PID" 2>/dev/null
    _rc=$?
    BRIDGE_PID=
    return $_rc
}
