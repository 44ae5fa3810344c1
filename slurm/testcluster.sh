#!/usr/bin/env bash
# SLURM test cluster on one machine (munge + MariaDB + slurmdbd + slurmctld + slurmd)
# for tests and CI. Usage: testcluster.sh start|stop|status|env   (see slurm/README.md)
#
# One compute node is this machine itself (partition `debug`, the default). Two more
# (partition `multi`) each run their own slurmd inside a network namespace with its own
# hostname (UTS namespace), joined to the controller by veth pairs on a private bridge,
# so that 2-node jobs really span two hosts. HPCVIZ_SLURM_MULTINODE=0 leaves them out;
# when they cannot come up, the single node still does and `start` says what failed.
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
# --- the two namespace nodes (partition multi); every name derives from the port base,
# so that two clusters (different HPCVIZ_SLURM_DIR and HPCVIZ_SLURM_PORT_BASE) can coexist.
MULTI=${HPCVIZ_SLURM_MULTINODE:-1}
MULTI_PARTITION=multi
if [[ $PORT_BASE == 6817 ]]; then MN_PREFIX=hpcviz; else MN_PREFIX=hpcviz$PORT_BASE; fi
MN_NODES=("$MN_PREFIX-n1" "$MN_PREFIX-n2")        # node = network namespace = hostname inside it
SUBNET=${HPCVIZ_SLURM_SUBNET:-10.201.$((PORT_BASE % 256))}  # a private /24, never routed anywhere
BRIDGE=hvbr$PORT_BASE                             # interface names: at most 15 characters
BRIDGE_IP=$SUBNET.1                               # slurmctld's address for everybody when multi is on
mn_ip() { echo "$SUBNET.$(($1 + 2))"; }           # node i (0, 1) -> .2, .3
mn_veth() { echo "hv${PORT_BASE}n$(($1 + 1))"; }  # root end of node i's veth pair (the other is eth0)
HOSTS_MARK="# hpcviz-testcluster dir=$DIR port=$PORT_BASE"   # our /etc/hosts lines end with this
MULTI_STATE=$DIR/run/multinode                    # "on", or "off" + why; written by start
MN_ERR=""                                         # what failed, for the messages
MN_TIMEOUT=${HPCVIZ_SLURM_MULTINODE_TIMEOUT:-60}
# Started daemons carry this variable; `stop` uses it to find their leftovers
# (e.g. slurmstepd forked by our slurmd), so it never has to match on names.
OWNER_MARK="HPCVIZ_TESTCLUSTER_OWNER=$DIR"
# Start order; stop goes the other way. Names are also what /proc/PID/comm says
# (slurmd@NODE: the slurmd of namespace node NODE).
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
MN_DAEMONS=(); for _n in "${MN_NODES[@]}"; do MN_DAEMONS+=("slurmd@$_n"); done

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
# slurm.conf names the slurmd files with %n (the node name), so that the three slurmds differ.
pidfile() {
    case $1 in
        slurmd) echo "$DIR/run/slurmd-$NODE.pid" ;;
        slurmd@*) echo "$DIR/run/slurmd-${1#slurmd@}.pid" ;;
        *) echo "$DIR/run/$1.pid" ;;
    esac
}
# Where an older testcluster.sh (single node only) kept the slurmd pid: still honoured by stop.
legacy_pidfile() { [[ $1 == slurmd ]] && echo "$DIR/run/slurmd.pid"; }
# True if process $1 exists and is not a zombie (pid 1 here may be slow to reap).
running() {
    local st; st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    st=${st##*) }; [[ ${st%% *} != Z ]]
}
# Prints the pid of daemon $1 if its pid file names a live process with that name.
alive_pid() {
    local f pid
    for f in $(pidfile "$1") $(legacy_pidfile "$1"); do
        [[ -s $f ]] || continue
        pid=$(tr -dc 0-9 <"$f"); [[ -n $pid ]] || continue
        running "$pid" && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "${1%%@*}"* ]] || continue
        echo "$pid"; return 0
    done
    return 1
}
all_alive() { local d; for d in "${DAEMONS[@]}"; do alive_pid "$d" >/dev/null || return 1; done; }
sinfo_ok() { timeout 10 sinfo -h >/dev/null 2>&1; }
sacct_ok() { timeout 10 sacct -n -X -S now >/dev/null 2>&1; }
node_state() { timeout 10 sinfo -h -N -n "${1:-$NODE}" -o %T 2>/dev/null | head -n1; }

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
    mkdir -p "$DIR"/{etc,run,log,munge,mysql/data,spool/slurmctld}
    chmod 711 "$DIR/munge"   # munged wants the socket reachable by all users
    if [[ ! -s $DIR/munge/munge.key ]]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    fi
    chmod 400 "$DIR/munge/munge.key"
    # With the namespace nodes, slurmctld must be reachable from inside them: its address is
    # then the bridge's (also local here). Without them, loopback as before.
    local ctld_addr=127.0.0.1 mn_conf="" i
    if [[ $MN_ON == 1 ]]; then
        ctld_addr=$BRIDGE_IP
        mn_conf="# The two namespace nodes (own network namespace, hostname and slurmd each), not in the default partition."
        for i in 0 1; do
            mn_conf+=$'\n'"NodeName=${MN_NODES[i]} NodeAddr=$(mn_ip "$i") CPUs=4 Boards=1 SocketsPerBoard=1 CoresPerSocket=4 ThreadsPerCore=1 RealMemory=8000 State=UNKNOWN"
        done
        mn_conf+=$'\n'"PartitionName=$MULTI_PARTITION Nodes=${MN_NODES[0]},${MN_NODES[1]} Default=NO MaxTime=INFINITE State=UP"
    fi
    cat >"$CONF" <<EOF
# Generated by slurm/testcluster.sh -- edits are overwritten on the next start.
ClusterName=$CLUSTER
SlurmctldHost=$NODE($ctld_addr)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/spool/slurmctld
# %n = the node name: each slurmd (this machine's, and one per namespace node) has its own.
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
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
$mn_conf
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

# --- the two namespace nodes (partition multi) ---------------------------------
# Each is a network namespace named like the node, with one end of a veth pair (eth0,
# $SUBNET.2/.3) whose other end hangs on the bridge $BRIDGE ($SUBNET.1) here; its slurmd
# runs in a UTS namespace whose hostname is the node name. Names resolve through marked
# /etc/hosts lines. Nothing is routed: each namespace knows only its /24.

# mn_run CMD...: run one setup command; on failure remember exactly what failed and why.
mn_run() {
    local out rc=0
    out=$("$@" 2>&1) || rc=$?
    ((rc == 0)) && return 0
    MN_ERR="\`$*\` failed (exit $rc): ${out:-no message}"
    return 1
}

mn_tools() {
    if ! command -v ip >/dev/null; then
        if command -v apt-get >/dev/null; then
            log "installing iproute2 for the namespace nodes (log: $DIR/log/apt.log)"
            { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends iproute2; } \
                >>"$DIR/log/apt.log" 2>&1 || true
        fi
        command -v ip >/dev/null || { MN_ERR="no \`ip\` command (Debian package iproute2), and installing it with apt-get failed or apt-get is missing (see $DIR/log/apt.log)"; return 1; }
    fi
    command -v unshare >/dev/null || { MN_ERR="no \`unshare\` command (util-linux)"; return 1; }
    command -v nsenter >/dev/null || { MN_ERR="no \`nsenter\` command (util-linux)"; return 1; }
    command -v flock >/dev/null || { MN_ERR="no \`flock\` command (util-linux)"; return 1; }
}

# The subnet must be ours alone: no address in it and no route into it on another interface.
mn_subnet_free() {
    local taken
    taken=$(ip -4 -o addr show 2>/dev/null | awk -v br="$BRIDGE" -v p="$SUBNET." '$2 != br && index($4, p) == 1 { printf "%s on %s; ", $4, $2 }')
    taken+=$(ip -4 route show root "$SUBNET.0/24" 2>/dev/null | grep -v " dev $BRIDGE " | sed 's/ *$//' | paste -sd ";" || true)
    [[ -z $taken ]] && return 0
    MN_ERR="subnet $SUBNET.0/24 is already in use here ($taken); set HPCVIZ_SLURM_SUBNET=10.201.N (another N)"
    return 1
}

mn_netns_exists() { ip netns list 2>/dev/null | awk '{ print $1 }' | grep -qxF "$1"; }

# hosts_edit add|remove: our marked lines of /etc/hosts (and only those), under a lock; the file
# is rewritten in place (it may be a bind mount), and only when it changes.
hosts_edit() {
    local tmp="$DIR/run/hosts.new" i
    [[ -w /etc/hosts ]] || { MN_ERR="/etc/hosts is not writable"; return 1; }
    mkdir -p "$DIR/run"
    (
        flock -w 20 9 || { echo "could not lock /etc/hosts within 20 s" >&2; exit 1; }
        awk -v m="$HOSTS_MARK" '{ i = index($0, "#"); if (i && substr($0, i) == m) next; print }' /etc/hosts >"$tmp"
        if [[ $1 == add ]]; then
            for i in 0 1; do printf '%s\t%s\t%s\n' "$(mn_ip "$i")" "${MN_NODES[i]}" "$HOSTS_MARK" >>"$tmp"; done
        fi
        cmp -s "$tmp" /etc/hosts || cat "$tmp" >/etc/hosts
        rm -f "$tmp"
    ) 9</etc/hosts || { MN_ERR="editing /etc/hosts failed"; return 1; }
}

mn_net_up() {
    local i ns veth got
    mn_tools && mn_subnet_free || return 1
    mn_net_down
    mn_run ip link add "$BRIDGE" type bridge || return 1
    mn_run ip addr add "$BRIDGE_IP/24" dev "$BRIDGE" || return 1
    mn_run ip link set "$BRIDGE" up || return 1
    for i in 0 1; do
        ns=${MN_NODES[i]} veth=$(mn_veth "$i")
        mn_run ip netns add "$ns" || return 1
        mn_run ip link add "$veth" type veth peer name eth0 netns "$ns" || return 1
        mn_run ip link set "$veth" master "$BRIDGE" || return 1
        mn_run ip link set "$veth" up || return 1
        mn_run ip -n "$ns" link set lo up || return 1
        mn_run ip -n "$ns" addr add "$(mn_ip "$i")/24" dev eth0 || return 1
        mn_run ip -n "$ns" link set eth0 up || return 1
    done
    hosts_edit add || return 1
    for i in 0 1; do
        got=$(getent hosts "${MN_NODES[i]}" | awk '{ print $1; exit }')
        [[ $got == "$(mn_ip "$i")" ]] || { MN_ERR="${MN_NODES[i]} resolves to '${got:-nothing}', not $(mn_ip "$i") (check /etc/nsswitch.conf and /etc/hosts)"; return 1; }
    done
}

# Remove what mn_net_up made (by our names only): processes left in our namespaces (by pid),
# the namespaces (their veth ends go with them), the root veth ends, the bridge, the hosts lines.
mn_net_down() {
    local i ns veth pids
    if command -v ip >/dev/null; then
        for i in 0 1; do
            ns=${MN_NODES[i]} veth=$(mn_veth "$i")
            if mn_netns_exists "$ns"; then
                pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ' || true)
                if [[ -n ${pids// /} ]]; then
                    log "ending processes still in namespace $ns: $pids"
                    # shellcheck disable=SC2086
                    term_wait 5 $pids
                fi
                ip netns del "$ns" 2>/dev/null || log "warning: \`ip netns del $ns\` failed"
            fi
            if ip link show "$veth" >/dev/null 2>&1; then ip link del "$veth" 2>/dev/null || log "warning: \`ip link del $veth\` failed"; fi
        done
        if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE" 2>/dev/null || log "warning: \`ip link del $BRIDGE\` failed"; fi
    fi
    if grep -qF -- "$HOSTS_MARK" /etc/hosts 2>/dev/null; then hosts_edit remove || log "warning: could not remove our lines from /etc/hosts"; fi
}

# Each namespace node's slurmd: own netns, own hostname, own spool/log/pid file (slurm.conf's %n).
mn_launch() {
    local n
    for n in "${MN_NODES[@]}"; do
        mkdir -p "$DIR/spool/slurmd-$n"
        # nsenter, not `ip netns exec`: that mounts a fresh /sys without /sys/fs/cgroup, and
        # slurmd 22.05 then dies in its cgroup plugin init even with proctrack/linuxproc.
        env "$OWNER_MARK" SLURM_CONF="$CONF" setsid nsenter --net="/run/netns/$n" unshare --uts \
            sh -c 'echo "$1" >/proc/sys/kernel/hostname && exec slurmd -f "$2" -N "$1"' sh "$n" "$CONF" \
            </dev/null >>"$DIR/log/slurmd-$n.out" 2>&1 &
    done
}

# Wait for the namespace nodes to be idle; on a timeout say, per node, what is wrong.
mn_wait() {
    local t0=$SECONDS end=$((SECONDS + MN_TIMEOUT)) n last dead
    until nodes_idle "${MN_NODES[@]}"; do
        dead=0  # a slurmd writes its pid file once it has daemonized: give it a few seconds
        if ((SECONDS >= t0 + 8)); then
            for n in "${MN_NODES[@]}"; do alive_pid "slurmd@$n" >/dev/null || dead=1; done
        fi
        if ((SECONDS >= end || dead)); then
            MN_ERR="the nodes did not become idle (after $((SECONDS - t0))s):"
            for n in "${MN_NODES[@]}"; do
                last=$(grep -hE "error|fatal" "$DIR/log/slurmd-$n.log" "$DIR/log/slurmd-$n.out" 2>/dev/null | tail -n1 || true)
                MN_ERR+=" $n is $(node_state "$n" || true), its slurmd is $(alive_pid "slurmd@$n" >/dev/null && echo running || echo NOT running)${last:+, last error: $last};"
            done
            MN_ERR+=" logs: $DIR/log/slurmd-${MN_PREFIX}-n{1,2}.{log,out}"
            return 1
        fi
        sleep 0.5
    done
}

conf_has_mn() { grep -q "^PartitionName=$MULTI_PARTITION " "$CONF" 2>/dev/null; }
multi_state() { head -n1 "$MULTI_STATE" 2>/dev/null || true; }
multi_reason() { sed -n 2p "$MULTI_STATE" 2>/dev/null || true; }

# mn_off failed|disabled: record that the namespace nodes are not part of this cluster, and why.
mn_off() {
    MN_ON=0
    mkdir -p "$DIR/run"
    printf 'off %s\n%s\n' "$1" "$MN_ERR" >"$MULTI_STATE"
    [[ $1 == failed ]] && log "WARNING: the 2 namespace nodes (partition $MULTI_PARTITION) are NOT up: $MN_ERR -- the single node (partition debug) is unaffected"
    return 0
}

# Everything of the namespace part there and answering?  Sets MN_ERR when not.
mn_healthy() {
    local i n s
    MN_ERR=""
    for i in 0 1; do
        n=${MN_NODES[i]}
        mn_netns_exists "$n" || { MN_ERR+="namespace $n missing; "; continue; }
        alive_pid "slurmd@$n" >/dev/null || MN_ERR+="slurmd of $n not running; "
        [[ $(getent hosts "$n" | awk '{ print $1; exit }') == "$(mn_ip "$i")" ]] || MN_ERR+="$n does not resolve to $(mn_ip "$i"); "
        s=$(node_state "$n")
        case $s in down* | drain* | fail* | *'*' | "") MN_ERR+="$n is ${s:-unknown to sinfo}; " ;; esac
    done
    ip link show "$BRIDGE" 2>/dev/null | grep -q "state UP" || MN_ERR+="bridge $BRIDGE missing or down; "
    MN_ERR=${MN_ERR%; }
    [[ -z $MN_ERR ]]
}

# Bring the namespace part up again under a running controller whose slurm.conf has it.
mn_repair() {
    local d pids=()
    for d in "${MN_DAEMONS[@]}"; do
        if pid=$(alive_pid "$d"); then pids+=("$pid"); fi
    done
    term_wait 15 "${pids[@]}"
    MN_ON=1
    if mn_net_up; then
        mn_launch
        mn_wait && { printf 'on\n\n' >"$MULTI_STATE"; return 0; }
    fi
    mn_off failed
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

# nodes_idle NODE...: all idle; down/drained ones are told to resume.
nodes_idle() {
    local n s all=0
    for n in "$@"; do
        s=$(node_state "$n")
        case $s in
            idle) ;;
            down* | drain* | *drain) timeout 10 scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true; all=1 ;;
            *) all=1 ;;
        esac
    done
    return $all
}
node_idle() { nodes_idle "$NODE"; }

mn_summary() {
    case $(multi_state) in
        on) echo "partition $MULTI_PARTITION: ${MN_NODES[0]} ($(mn_ip 0)) and ${MN_NODES[1]} ($(mn_ip 1)) in their own network namespaces" ;;
        "off disabled") echo "partition $MULTI_PARTITION: off (HPCVIZ_SLURM_MULTINODE=0)" ;;
        off*) echo "partition $MULTI_PARTITION: NOT up ($(multi_reason))$(conf_has_mn || echo "; \`$0 stop\` then \`$0 start\` tries again")" ;;
        *) echo "partition $MULTI_PARTITION: none (started by an older testcluster.sh)" ;;
    esac
}

start_cluster() {
    local t0=$SECONDS d p state
    MN_ON=0
    if all_alive && sinfo_ok; then
        state=$(multi_state)
        local repair=0
        if [[ $MULTI == 1 && $state == on ]]; then
            mn_healthy || repair=1
        elif [[ $MULTI == 1 && $state == "off failed" ]] && conf_has_mn; then
            repair=1 MN_ERR=$(multi_reason)   # they failed after slurm.conf had them: no restart needed
        fi
        if ((repair)); then
            log "running under $DIR, but the namespace nodes are not all there ($MN_ERR); bringing them up again"
            mn_repair
            log "reused in $((SECONDS - t0))s; $(mn_summary)"
            return 0
        fi
        if [[ $MULTI == 1 && -z $state ]]; then  # an older testcluster.sh: its slurm.conf has no namespace nodes
            # never restarted behind its user's back (a fresh start empties the cluster)
            log "WARNING: the cluster under $DIR was started by an older testcluster.sh and has no partition $MULTI_PARTITION; left as it is (reused); run \`$0 stop\` then \`$0 start\` to get the namespace nodes"
        else
            log "already running under $DIR (reused, $((SECONDS - t0))s); $(mn_summary)"
        fi
        return 0
    fi
    ensure_packages
    for d in "${DAEMONS[@]}" "${MN_DAEMONS[@]}"; do
        if alive_pid "$d" >/dev/null; then log "a previous start is half up; stopping it first"; stop_cluster; break; fi
    done
    for p in "$CTLD_PORT" "$SLURMD_PORT" "$DBD_PORT" "$MYSQL_PORT"; do
        tcp_open "$p" && die "port $p on 127.0.0.1 is taken (another cluster running? stop it, or set HPCVIZ_SLURM_PORT_BASE)"
    done
    mkdir -p "$DIR"/{run,log}
    local t_mn; t_mn=$(date +%s%N)
    if [[ $MULTI == 1 ]]; then
        MN_ON=1
        if ! mn_net_up; then
            local why=$MN_ERR
            mn_net_down
            MN_ERR=$why
            MN_ON=0
        fi
    else
        mn_net_down
    fi
    t_mn=$((($(date +%s%N) - t_mn) / 1000000))
    write_configs   # with the namespace nodes only if their network is up (MN_ON)
    if [[ $MULTI != 1 ]]; then MN_ERR="disabled"; mn_off disabled
    elif [[ $MN_ON != 1 ]]; then mn_off failed
    fi
    start_munged
    start_mariadb
    start_slurmdbd
    launch slurmctld slurmctld -f "$CONF"
    wait_for 60 slurmctld sinfo_ok
    local t_ctld=$SECONDS
    mkdir -p "$DIR/spool/slurmd-$NODE"
    launch slurmd slurmd -f "$CONF"
    [[ $MN_ON == 1 ]] && mn_launch
    wait_for "$START_TIMEOUT" "node $NODE to become idle" node_idle
    if [[ $MN_ON == 1 ]]; then
        if mn_wait; then printf 'on\n\n' >"$MULTI_STATE"; else mn_off failed; fi
        log "namespace nodes: network set up in ${t_mn} ms, both nodes idle $((SECONDS - t_ctld))s after slurmctld answered"
    fi
    wait_for 60 "sacct to answer" sacct_ok
    all_alive || die "a daemon died during start; logs are in $DIR/log/"
    log "up in $((SECONDS - t0))s: slurm $(sinfo -V | awk '{print $2}'), node $NODE in partition debug, $(mn_summary); state in $DIR"
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
    stop_group slurmd "${MN_DAEMONS[@]}" slurmctld
    stop_group slurmdbd
    stop_group mariadbd munged
    local left; left=$(leftover_pids | tr '\n' ' ')
    if [[ -n ${left// /} ]]; then
        log "ending leftover processes started by this cluster: $left"
        # shellcheck disable=SC2086
        term_wait 5 $left
    fi
    mn_net_down   # namespaces, veths, bridge, /etc/hosts lines (ours only)
    rm -f "$MULTI_STATE"
    log "stopped (logs kept in $DIR/log; the next start begins with an empty cluster)"
}

# Exit 0: all up (the namespace nodes too, unless disabled); 1: the cluster is not up;
# 3: the cluster is up but its namespace nodes (partition multi) are not.
status_cluster() {
    local d pid ok=0 i n state
    for d in "${DAEMONS[@]}"; do
        if pid=$(alive_pid "$d"); then printf '  %-10s pid %s\n' "$d" "$pid"; else printf '  %-10s DOWN\n' "$d"; ok=1; fi
    done
    if ((ok == 0)) && sinfo_ok; then
        printf '  node %s: %s; jobs in queue: %s; sacct: %s\n' "$NODE" "$(node_state)" \
            "$(timeout 10 squeue -h | wc -l)" "$(sacct_ok && echo ok || echo NOT answering)"
        state=$(multi_state)
        if [[ $state == on ]]; then
            for i in 0 1; do
                n=${MN_NODES[i]}
                printf '  node %s (%s, netns %s): %s; slurmd %s\n' "$n" "$(mn_ip "$i")" \
                    "$(mn_netns_exists "$n" && echo present || echo MISSING)" "$(node_state "$n")" \
                    "$(pid=$(alive_pid "slurmd@$n") && echo "pid $pid" || echo DOWN)"
            done
            if mn_healthy; then
                echo "  $(mn_summary): UP (bridge $BRIDGE $BRIDGE_IP/24)"
            else
                echo "  partition $MULTI_PARTITION: BROKEN: $MN_ERR (\`$0 start\` brings the namespace nodes up again)"
                ok=3
            fi
        else
            echo "  $(mn_summary)"
            [[ $state == "off disabled" ]] || ok=3
        fi
        echo "testcluster: UP ($DIR)$( ((ok == 3)) && echo ", without its namespace nodes")"
        return "$ok"
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
