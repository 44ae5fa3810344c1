#!/usr/bin/env bash
# Single-node SLURM test cluster (munge + MariaDB + slurmdbd + slurmctld + slurmd)
# for tests and CI. Usage: testcluster.sh start|stop|status|env   (see slurm/README.md)
#
# Everything lives under ${HPCVIZ_SLURM_DIR:-/tmp/hpcviz-slurm}; clients find it
# through SLURM_CONF=<dir>/etc/slurm.conf (`eval "$(testcluster.sh env)"`).
# No systemd is assumed: the daemons are started directly, each with its own
# pid file in <dir>/run, and `stop` ends only those pids (never by name).
set -euo pipefail

DIR=$(realpath -m "${HPCVIZ_SLURM_DIR:-/tmp/hpcviz-slurm}")  # absolute: daemons must not depend on cwd
CONF=$DIR/etc/slurm.conf
DBDCONF=$DIR/etc/slurmdbd.conf
MUNGE_SOCKET=$DIR/munge/munge.socket
MYSQL_SOCKET=$DIR/mysql/mysqld.sock
PORT_BASE=${HPCVIZ_SLURM_PORT_BASE:-6817}   # ctld, slurmd, slurmdbd, mariadb = base+0..3
CTLD_PORT=$PORT_BASE SLURMD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2)) MYSQL_PORT=$((PORT_BASE + 3))
CLUSTER=hpcviz
NODE=$(hostname -s)
START_TIMEOUT=${HPCVIZ_SLURM_START_TIMEOUT:-120}
# Started daemons carry this variable; `stop` uses it to find their leftovers
# (e.g. slurmstepd forked by our slurmd), so it never has to match on names.
OWNER_MARK="HPCVIZ_TESTCLUSTER_OWNER=$DIR"
# Start order; stop goes the other way. Names are also what /proc/PID/comm says.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

export SLURM_CONF=$CONF
log() { echo "testcluster: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# --- packages ---------------------------------------------------------------
missing_packages() {
    local pkgs=()
    { command -v slurmctld && command -v slurmd && command -v sbatch; } >/dev/null || pkgs+=(slurm-wlm)
    command -v slurmdbd >/dev/null || pkgs+=(slurmdbd)
    command -v munged >/dev/null || pkgs+=(munge)
    { command -v mariadbd && command -v mariadb-install-db && command -v mariadb; } >/dev/null || pkgs+=(mariadb-server)
    echo "${pkgs[@]}"
}

ensure_packages() {
    local missing; missing=$(missing_packages)
    if [[ $(id -u) -ne 0 ]]; then
        echo "testcluster: start needs root (SlurmUser=root, daemons, apt-get); you are uid $(id -u)${missing:+ and these packages are missing: $missing}. Run it as root." >&2
        exit 2
    fi
    [[ -z $missing ]] && return 0
    if ! command -v apt-get >/dev/null; then
        echo "testcluster: packages missing ($missing) and there is no apt-get; install Debian's slurm-wlm slurmdbd munge mariadb-server (or equivalents) by hand." >&2
        exit 2
    fi
    mkdir -p "$DIR/log"
    log "installing $missing (log: $DIR/log/apt.log)"
    # Keep the packages' init scripts from starting system-wide daemons we do not own.
    local made_policy=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    apt-get update -q >>"$DIR/log/apt.log" 2>&1 || log "warning: apt-get update reported errors (see $DIR/log/apt.log); trying the install anyway"
    # shellcheck disable=SC2086
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >>"$DIR/log/apt.log" 2>&1; then
        [[ -n $made_policy ]] && rm -f /usr/sbin/policy-rc.d
        tail -n 20 "$DIR/log/apt.log" >&2; die "apt-get install $missing failed (see $DIR/log/apt.log)"
    fi
    [[ -n $made_policy ]] && rm -f /usr/sbin/policy-rc.d
    missing=$(missing_packages)
    [[ -z $missing ]] || die "still missing after apt-get install: $missing"
}

# --- pids -------------------------------------------------------------------
pidfile() { echo "$DIR/run/$1.pid"; }
# True if process $1 exists and is not a zombie (pid 1 here may be slow to reap).
running() {
    local st; st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    st=${st##*) }; [[ ${st%% *} != Z ]]
}
# Prints the pid of daemon $1 if its pid file names a live process with that name.
alive_pid() {
    local f pid; f=$(pidfile "$1")
    [[ -s $f ]] || return 1
    pid=$(tr -dc 0-9 <"$f"); [[ -n $pid ]] || return 1
    running "$pid" && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1"* ]] || return 1
    echo "$pid"
}
all_alive() { local d; for d in "${DAEMONS[@]}"; do alive_pid "$d" >/dev/null || return 1; done; }
sinfo_ok() { timeout 10 sinfo -h >/dev/null 2>&1; }
sacct_ok() { timeout 10 sacct -n -X -S now >/dev/null 2>&1; }
node_state() { timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1; }

# wait_for SECONDS WHAT CMD...: poll CMD until it succeeds, or fail pointing at the logs.
wait_for() {
    local limit=$1 what=$2; shift 2
    local end=$((SECONDS + limit))
    until "$@"; do
        if ((SECONDS >= end)); then
            die "timed out after ${limit}s waiting for $what; logs are in $DIR/log/ (slurmctld.log slurmd.log slurmdbd.log mysqld.log munged.log)"
        fi
        sleep 0.5
    done
}

# Run a daemon in its own session with our marker in its environment, stdio detached.
launch() {
    local name=$1; shift
    env "$OWNER_MARK" SLURM_CONF="$CONF" setsid "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 &
}

# --- configuration ----------------------------------------------------------
write_configs() {
    # Every fresh start is a clean cluster: no jobs recovered from a previous
    # (maybe killed) run, job ids from 1. The accounting database is emptied too.
    rm -rf "$DIR/spool"
    mkdir -p "$DIR"/{etc,run,log,munge,mysql/data,spool/slurmctld,spool/slurmd}
    chmod 711 "$DIR/munge"   # munged wants the socket reachable by all users
    if [[ ! -s $DIR/munge/munge.key ]]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    fi
    chmod 400 "$DIR/munge/munge.key"
    cat >"$CONF" <<EOF
# Generated by slurm/testcluster.sh -- edits are overwritten on the next start.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/spool/slurmctld
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No usable cgroups in the container: track processes by parentage, no binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# Clients reach slurmdbd with this munge socket, not AuthInfo's.
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none
# Requeue (scontrol requeue, submitit preemption/timeout) must work.
JobRequeue=1
# Short kill grace, finished jobs stay visible in squeue/scontrol for 10 minutes.
KillWait=5
MinJobAge=600
InactiveLimit=0
Waittime=0
SlurmdTimeout=300
ReturnToService=2
# The node claims more CPUs/memory than the container has, so that 2-task jobs
# and arrays run side by side; config_overrides stops slurmd from draining it.
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=8 Boards=1 SocketsPerBoard=1 CoresPerSocket=8 ThreadsPerCore=1 RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$DBDCONF" <<EOF
# Generated by slurm/testcluster.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$DIR/log/slurmdbd.log
PidFile=$(pidfile slurmdbd)
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DBDCONF"   # slurmdbd refuses a config readable by others
    printf 'export SLURM_CONF=%s\nexport HPCVIZ_SLURM_DIR=%s\n' "$CONF" "$DIR" >"$DIR/env"
}

# --- daemons ----------------------------------------------------------------
start_munged() {
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    launch munged munged --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
        --pid-file="$(pidfile munged)" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" --force
    wait_for 20 munged bash -c "{ munge -n --socket='$MUNGE_SOCKET' | unmunge --socket='$MUNGE_SOCKET'; } >/dev/null 2>&1"
}

tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_mariadb() {
    local args=(--no-defaults --user=root --datadir="$DIR/mysql/data")
    if [[ ! -d $DIR/mysql/data/mysql ]]; then
        mariadb-install-db "${args[@]}" --auth-root-authentication-method=normal \
            --skip-test-db >>"$DIR/log/mysqld.log" 2>&1 || die "mariadb-install-db failed, see $DIR/log/mysqld.log"
    fi
    # Test database only: no grant checks, loopback only, small and not durable.
    launch mysqld mariadbd "${args[@]}" --socket="$MYSQL_SOCKET" --pid-file="$(pidfile mariadbd)" \
        --log-error="$DIR/log/mysqld.log" --port="$MYSQL_PORT" --bind-address=127.0.0.1 \
        --skip-grant-tables --innodb-buffer-pool-size=64M --innodb-log-file-size=16M \
        --innodb-flush-log-at-trx-commit=0 --innodb-lock-wait-timeout=900
    wait_for 60 "mariadb on port $MYSQL_PORT" tcp_open "$MYSQL_PORT"
    mariadb --no-defaults --socket="$MYSQL_SOCKET" -e 'DROP DATABASE IF EXISTS slurm_acct_db' \
        || die "could not reset the accounting database, see $DIR/log/mysqld.log"
}

cluster_registered() { timeout 10 sacctmgr -n -P show cluster "$CLUSTER" format=cluster 2>/dev/null | grep -qx "$CLUSTER"; }

start_slurmdbd() {
    launch slurmdbd slurmdbd   # reads slurmdbd.conf next to $SLURM_CONF
    wait_for 60 slurmdbd bash -c "timeout 10 sacctmgr -n show cluster >/dev/null 2>&1"
    cluster_registered || timeout 20 sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
}

node_idle() {
    local s; s=$(node_state)
    case $s in
        idle) return 0 ;;
        down* | drain* | *drain) timeout 10 scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    return 1
}

start_cluster() {
    local t0=$SECONDS d p
    if all_alive && sinfo_ok; then
        log "already running under $DIR (reused, $((SECONDS - t0))s)"
        return 0
    fi
    ensure_packages
    for d in "${DAEMONS[@]}"; do
        if alive_pid "$d" >/dev/null; then log "a previous start is half up; stopping it first"; stop_cluster; break; fi
    done
    for p in "$CTLD_PORT" "$SLURMD_PORT" "$DBD_PORT" "$MYSQL_PORT"; do
        tcp_open "$p" && die "port $p on 127.0.0.1 is taken (another cluster running? stop it, or set HPCVIZ_SLURM_PORT_BASE)"
    done
    write_configs
    start_munged
    start_mariadb
    start_slurmdbd
    launch slurmctld slurmctld -f "$CONF"
    wait_for 60 slurmctld sinfo_ok
    launch slurmd slurmd -f "$CONF"
    wait_for "$START_TIMEOUT" "node $NODE to become idle" node_idle
    wait_for 60 "sacct to answer" sacct_ok
    all_alive || die "a daemon died during start; logs are in $DIR/log/"
    log "up in $((SECONDS - t0))s: slurm $(sinfo -V | awk '{print $2}'), node $NODE, partition debug, state in $DIR"
}

# --- stop ---------------------------------------------------------------------
# Pids of processes whose environment carries our marker (our daemons and the
# slurmstepds they forked) plus all their descendants (job processes), excluding
# this script and its ancestors.
leftover_pids() {
    local p env roots="" self
    self=" $$ $(ps -o ppid= -p $$ | tr -d ' ') "
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [[ $self == *" $p "* ]] && continue
        env=$(tr '\0' '\n' 2>/dev/null <"/proc/$p/environ") || continue
        grep -qxF "$OWNER_MARK" <<<"$env" && roots+=" $p"
    done
    [[ -n $roots ]] || return 0
    ps -e -o pid=,ppid= | awk -v roots="$roots" '
        BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
        { parent[$1] = $2 }
        END { do { more = 0; for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; more = 1 } } while (more)
              for (p in keep) print p }'
}

# term_wait GRACE PIDS...: SIGTERM, wait up to GRACE seconds, then SIGKILL.
term_wait() {
    local grace=$1 p end; shift
    (($#)) || return 0
    kill -TERM "$@" 2>/dev/null || true
    end=$((SECONDS + grace))
    while ((SECONDS < end)); do
        for p in "$@"; do running "$p" && break; p=""; done
        [[ -z $p ]] && return 0
        sleep 0.2
    done
    local alive=(); for p in "$@"; do running "$p" && alive+=("$p"); done
    ((${#alive[@]})) || return 0
    log "still alive ${grace}s after SIGTERM, sending SIGKILL: ${alive[*]}"
    kill -KILL "${alive[@]}" 2>/dev/null || true
}

# stop_group NAMES...: end these daemons together (by pid file) and forget their pids.
stop_group() {
    local d pid pids=()
    for d in "$@"; do
        if pid=$(alive_pid "$d"); then pids+=("$pid"); fi
        rm -f "$(pidfile "$d")"
    done
    term_wait 15 "${pids[@]}"
}

stop_cluster() {
    # Cancel jobs first: slurmd leaves running steps alive when it exits.
    if alive_pid slurmctld >/dev/null && sinfo_ok; then
        local jobs; jobs=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            timeout 10 scancel $jobs 2>/dev/null || true
            local end=$((SECONDS + 15))
            while ((SECONDS < end)) && [[ -n $(timeout 5 squeue -h -t R,CG,S,CF -o %A 2>/dev/null) ]]; do sleep 0.5; done
        fi
    fi
    # slurmctld still queues its last records for slurmdbd in its state dir, so
    # the slurm daemons may stop together; then the database, then munge.
    stop_group slurmd slurmctld
    stop_group slurmdbd
    stop_group mariadbd munged
    local left; left=$(leftover_pids | tr '\n' ' ')
    if [[ -n ${left// /} ]]; then
        log "ending leftover processes started by this cluster: $left"
        # shellcheck disable=SC2086
        term_wait 5 $left
    fi
    log "stopped (logs kept in $DIR/log; the next start begins with an empty cluster)"
}

status_cluster() {
    local d pid ok=0
    for d in "${DAEMONS[@]}"; do
        if pid=$(alive_pid "$d"); then printf '  %-10s pid %s\n' "$d" "$pid"; else printf '  %-10s DOWN\n' "$d"; ok=1; fi
    done
    if ((ok == 0)) && sinfo_ok; then
        printf '  node %s: %s; jobs in queue: %s; sacct: %s\n' "$NODE" "$(node_state)" \
            "$(timeout 10 squeue -h | wc -l)" "$(sacct_ok && echo ok || echo NOT answering)"
        echo "testcluster: UP ($DIR)"
        return 0
    fi
    echo "testcluster: NOT up ($DIR)"
    return 1
}

case ${1:-} in
    start) start_cluster ;;
    stop) stop_cluster ;;
    status) status_cluster ;;
    env) printf 'export SLURM_CONF=%s\nexport HPCVIZ_SLURM_DIR=%s\n' "$CONF" "$DIR" ;;
    *) echo "usage: $0 start|stop|status|env   (state in \${HPCVIZ_SLURM_DIR:-/tmp/hpcviz-slurm})" >&2; exit 64 ;;
esac
