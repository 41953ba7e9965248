# Shell helpers for test scripts in the vscsi-bridge guest (busybox ash).
# /init sources this file; a test script can source it too:
#   . /lib/vscsi/helpers.sh

# vscsi_wait_disks N [SECONDS]: wait until at least N SCSI disks (sd*) exist.
vscsi_wait_disks() {
    want=$1; limit=${2:-30}; n=0
    while :; do
        have=$(ls -d /sys/block/sd* 2>/dev/null | wc -l)
        [ "$have" -ge "$want" ] && return 0
        [ "$n" -ge $((limit * 10)) ] && { echo "vscsi_wait_disks: $have of $want disks" >&2; return 1; }
        usleep 100000; n=$((n + 1))
    done
}

# vscsi_lsscsi: one line per SCSI device, like lsscsi, read from sysfs
# (busybox's lsscsi prints nothing here):
#   [H:C:T:L] TYPE VENDOR MODEL REV /dev/sdX /dev/sgN SIZE_BYTES
vscsi_lsscsi() {
    for d in /sys/bus/scsi/devices/*:*:*:*; do
        [ -d "$d" ] || continue
        hctl=${d##*/}
        type=$(cat "$d/type" 2>/dev/null)
        vendor=$(cat "$d/vendor" 2>/dev/null | tr -d ' ')
        model=$(cat "$d/model" 2>/dev/null | sed 's/ *$//' | tr ' ' _)
        rev=$(cat "$d/rev" 2>/dev/null | tr -d ' ')
        blk=$(ls "$d/block" 2>/dev/null | head -n1)
        sg=$(ls "$d/scsi_generic" 2>/dev/null | head -n1)
        size=-
        [ -n "$blk" ] && size=$(( $(cat /sys/block/$blk/size) * 512 ))
        echo "[$hctl] type=$type $vendor $model $rev ${blk:+/dev/$blk} ${sg:+/dev/$sg} $size"
    done
}

# vscsi_serve TTY: command loop for long-lived guests. Each request is one
# line "RUN <id> <base64 script>"; the reply is the script's output (base64,
# one line "OUT <id> <base64>") then "DONE <id> <rc>". "POWEROFF" ends the loop.
vscsi_serve() {
    tty=$1
    stty -F "$tty" raw -echo 2>/dev/null
    echo "VSCSI-SERVING $tty"
    exec 3<>"$tty"
    echo "HELLO" >&3
    while read -r verb id payload <&3; do
        case "$verb" in
            RUN)
                echo "$payload" | base64 -d >/tmp/cmd.sh 2>/dev/null
                sh /tmp/cmd.sh </dev/null >/tmp/cmd.out 2>&1
                rc=$?
                echo "OUT $id $(base64 -w 0 </tmp/cmd.out)" >&3
                echo "DONE $id $rc" >&3
                ;;
            POWEROFF) echo "BYE" >&3; break ;;
            *) ;;
        esac
    done
    exec 3>&-
}
