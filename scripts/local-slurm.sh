#!/usr/bin/env bash
# A one-node SLURM "cluster" on 127.0.0.1, for tests and demos of rollmed-dask on SLURM.
#
#   sudo bash scripts/local-slurm.sh [start]   install (if missing), configure, start, wait for idle
#   sudo bash scripts/local-slurm.sh stop      stop the daemons this script started
#   sudo bash scripts/local-slurm.sh status    show daemons, sinfo, squeue; exit 0 iff node usable
#
# Uses Debian's packages (slurmctld, slurmd, slurm-client, munge). No systemd is needed:
# the daemons are started directly, as root (SlurmUser=root). Works non-interactively
# (CI=true, no stdin, no tty). Idempotent: `start` on a running, up-to-date setup is a no-op.
#
# Environment knobs:
#   LOCAL_SLURM_TIMEOUT   seconds to wait for the node to become idle (default 60)
#   LOCAL_SLURM_CLUSTER   ClusterName (default rollmed)
set -euo pipefail

CMD=${1:-start}
TIMEOUT=${LOCAL_SLURM_TIMEOUT:-60}
CLUSTER=${LOCAL_SLURM_CLUSTER:-rollmed}

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARKER="# written by rollmed-dask scripts/local-slurm.sh"
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/rollmed-local-slurm          # our own bookkeeping: what we started
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
MUNGE_KEY=/etc/munge/munge.key

log() { printf 'local-slurm: %s\n' "$*"; }
err() { printf 'local-slurm: ERROR: %s\n' "$*" >&2; }

if [[ $EUID -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        exec sudo -n -E bash "$0" "$@"
    fi
    err "must run as root: sudo bash $0 $CMD"
    exit 1
fi

export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH

# ---------------------------------------------------------------------------- helpers

# pid_alive PIDFILE NAME: the pid in PIDFILE is running and its command is NAME
pid_alive() {
    local pidfile=$1 name=$2 pid
    [[ -r $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm") == "$name" ]]
}

# stop_pidfile PIDFILE NAME: TERM (then KILL after 10 s) the daemon recorded in PIDFILE
stop_pidfile() {
    local pidfile=$1 name=$2 pid i
    if ! pid_alive "$pidfile" "$name"; then
        rm -f "$pidfile"
        return 0
    fi
    pid=$(tr -dc '0-9' <"$pidfile")
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        [[ -d /proc/$pid ]] || break
        sleep 0.1
    done
    if [[ -d /proc/$pid ]]; then
        log "$name did not stop on TERM, sending KILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$pidfile"
}

# stop_orphans NAME: TERM daemons called NAME that no pid file records (left behind when
# a pid file was lost); they would hold the port the new daemon needs.
stop_orphans() {
    local name=$1 pids
    pids=$(pgrep -x "$name" || true)
    [[ -z $pids ]] && return 0
    log "stopping $name left running without a pid file (pids $(echo $pids))"
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    sleep 2
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
}

# start_daemon PIDFILE NAME: start NAME (a daemon that forks itself) unless it runs.
start_daemon() {
    local pidfile=$1 name=$2
    pid_alive "$pidfile" "$name" && return 0
    log "starting $name"
    rm -f "$pidfile"
    stop_orphans "$name"
    "$name" </dev/null || {
        show_logs
        err "$name failed to start"
        exit 1
    }
    touch "$RUN_DIR/$name.started"
}

# daemon_running PIDFILE NAME: the daemon is up, allowing it a few seconds to write its
# pid file. The daemons fork into the background and write the file from the grandchild,
# so right after `slurmd` returns the file may still be missing or hold a stale pid:
# a loaded machine failed CI on exactly that race.
daemon_running() {
    local pidfile=$1 name=$2 i
    for ((i = 0; i < 100; i++)); do
        pid_alive "$pidfile" "$name" && return 0
        sleep 0.1
    done
    return 1
}

node_state() {
    # prints e.g. "idle", "mixed", "down*", "" if sinfo cannot reach slurmctld
    timeout 10 sinfo -h -N -o '%T' 2>/dev/null | head -n1 || true
}

node_usable() {
    case "$(node_state)" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

show_logs() {
    local f
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        if [[ -s $f ]]; then
            printf -- '--- last lines of %s ---\n' "$f" >&2
            tail -n 25 "$f" >&2
        fi
    done
}

# ---------------------------------------------------------------------------- install

install_packages() {
    local missing=()
    command -v munged >/dev/null 2>&1 || missing+=(munge)
    command -v slurmctld >/dev/null 2>&1 || missing+=(slurmctld)
    command -v slurmd >/dev/null 2>&1 || missing+=(slurmd)
    command -v sinfo >/dev/null 2>&1 || missing+=(slurm-client)
    [[ ${#missing[@]} -eq 0 ]] && return 0

    log "installing ${missing[*]} from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    # keep the packages' maintainer scripts from starting services: we start them ourselves
    local own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    local rc=0
    {
        apt-get update -q -y &&
            apt-get install -q -y --no-install-recommends \
                -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
                "${missing[@]}"
    } </dev/null >"${TMPDIR:-/tmp}/local-slurm-apt.log" 2>&1 || rc=$?
    [[ $own_policy -eq 1 ]] && rm -f /usr/sbin/policy-rc.d
    if [[ $rc -ne 0 ]]; then
        tail -n 30 "${TMPDIR:-/tmp}/local-slurm-apt.log" >&2
        err "apt-get install ${missing[*]} failed (exit $rc); full log: ${TMPDIR:-/tmp}/local-slurm-apt.log"
        exit 1
    fi
}

# ---------------------------------------------------------------------------- munge

start_munge() {
    local user=root
    id munge >/dev/null 2>&1 && user=munge
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating munge key $MUNGE_KEY"
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
    fi
    chown "$user:$user" /etc/munge "$MUNGE_KEY" /var/lib/munge /var/log/munge /run/munge
    chmod 700 /etc/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    chmod 400 "$MUNGE_KEY"

    if pid_alive "$MUNGE_PID" munged; then
        return 0
    fi
    log "starting munged (as $user)"
    if [[ $user == root ]]; then
        munged --force
    else
        runuser -u munge -- munged
    fi
    local i
    for ((i = 0; i < 50; i++)); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        show_logs
        err "munged does not answer (munge -n | unmunge fails)"
        exit 1
    fi
    touch "$RUN_DIR/munged.started"
}

# ---------------------------------------------------------------------------- slurm.conf

write_conf() {
    # node line from the hardware as slurmd sees it, with our address
    local node
    node=$(slurmd -C 2>/dev/null | grep -m1 '^NodeName=') || true
    if [[ -z $node ]]; then
        err "slurmd -C printed no NodeName line"
        slurmd -C >&2 || true
        exit 1
    fi
    local nodename
    nodename=$(sed -E 's/^NodeName=([^ ]+).*/\1/' <<<"$node")

    local new
    new=$(
        cat <<EOF
$MARKER -- do not edit, rerun the script
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default, a job that asks no memory would take the whole node
DefMemPerCPU=1024
ReturnToService=2
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=60
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=60
Waittime=0
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$nodename Default=YES MaxTime=INFINITE State=UP
EOF
    )
    mkdir -p "$CONF_DIR"
    if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        log "keeping the existing $CONF as $CONF.bak"
        mv -f "$CONF" "$CONF.bak"
    fi
    if [[ -e $CONF ]] && [[ $(cat "$CONF") == "$new" ]]; then
        CONF_CHANGED=0
    else
        printf '%s\n' "$new" >"$CONF"
        chmod 644 "$CONF"
        CONF_CHANGED=1
        log "wrote $CONF"
    fi
}

# ---------------------------------------------------------------------------- commands

do_start() {
    local t0=$SECONDS
    mkdir -p "$RUN_DIR"
    install_packages
    start_munge
    mkdir -p "$CTLD_SPOOL" "$SLURMD_SPOOL" "$LOG_DIR"
    CONF_CHANGED=0
    write_conf

    if [[ $CONF_CHANGED -eq 1 ]]; then
        # node definitions cannot be changed by `scontrol reconfigure`: restart
        stop_pidfile "$SLURMD_PID" slurmd
        stop_pidfile "$CTLD_PID" slurmctld
    fi
    start_daemon "$CTLD_PID" slurmctld
    start_daemon "$SLURMD_PID" slurmd

    local deadline=$((SECONDS + TIMEOUT)) state="" resumed=0
    while ((SECONDS < deadline)); do
        local d
        for d in "slurmctld:$CTLD_PID" "slurmd:$SLURMD_PID"; do
            if ! daemon_running "${d#*:}" "${d%%:*}"; then
                sleep 0.5 # let it finish its log
                show_logs
                err "${d%%:*} exited right after starting (see its log above)"
                exit 1
            fi
        done
        state=$(node_state)
        case "$state" in
            idle | mixed | allocated | completing)
                log "node is $state; SLURM is up ($((SECONDS - t0)) s)"
                return 0
                ;;
            down* | drain* | fail*)
                # e.g. left down by an earlier run: bring it back once
                if [[ $resumed -eq 0 ]]; then
                    scontrol update NodeName=ALL State=RESUME >/dev/null 2>&1 || true
                    resumed=1
                fi
                ;;
        esac
        sleep 1
    done
    show_logs
    timeout 10 sinfo -N -l >&2 || true
    err "the SLURM node did not become idle within ${TIMEOUT} s (last state: '${state:-no answer from slurmctld}')"
    exit 1
}

do_stop() {
    # cancel the jobs of this controller first, so no job step (e.g. a dask worker) outlives it
    if pid_alive "$CTLD_PID" slurmctld && [[ -n $(timeout 10 squeue -h -o %i 2>/dev/null) ]]; then
        log "cancelling the jobs in the queue"
        # shellcheck disable=SC2046
        timeout 10 scancel --full $(timeout 10 squeue -h -o %i 2>/dev/null) 2>/dev/null || true
        local i
        for ((i = 0; i < 15; i++)); do
            [[ -z $(timeout 10 squeue -h -o %i 2>/dev/null) ]] && break
            sleep 1
        done
    fi
    stop_pidfile "$SLURMD_PID" slurmd
    stop_pidfile "$CTLD_PID" slurmctld
    if [[ -e $RUN_DIR/munged.started ]]; then
        stop_pidfile "$MUNGE_PID" munged
    fi
    rm -rf "$RUN_DIR"
    log "stopped"
}

do_status() {
    local rc=0 d
    for d in "munged:$MUNGE_PID" "slurmctld:$CTLD_PID" "slurmd:$SLURMD_PID"; do
        if pid_alive "${d#*:}" "${d%%:*}"; then
            printf '%-10s running (pid %s)\n' "${d%%:*}" "$(tr -dc '0-9' <"${d#*:}")"
        else
            printf '%-10s not running\n' "${d%%:*}"
            rc=1
        fi
    done
    if command -v sinfo >/dev/null 2>&1; then
        timeout 10 sinfo -N -l || true
        timeout 10 squeue || true
    else
        echo "sinfo: not installed"
    fi
    node_usable || rc=1
    return $rc
}

case "$CMD" in
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
    restart)
        do_stop
        do_start
        ;;
    -h | --help | help) sed -n '2,14p' "$0" ;;
    *)
        err "unknown command '$CMD' (use start, stop, status)"
        exit 2
        ;;
esac
