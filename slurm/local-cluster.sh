#!/usr/bin/env bash
# Start, stop or check a real single-node SLURM cluster on 127.0.0.1 (munge, MariaDB,
# slurmdbd, slurmctld, slurmd), for integration tests and for trying the SLURM profile
# on one machine. Needs root and Debian's packages:
#
#   slurm/local-cluster.sh install   # apt-get install slurmctld slurmd slurm-client slurmdbd munge mariadb-server
#                                    # (skipped when the daemons are already installed)
#   slurm/local-cluster.sh start     # write configs, start the daemons, wait for an idle node
#   slurm/local-cluster.sh status    # exit 0 when the node is idle or allocated
#   slurm/local-cluster.sh stop
#
# Accounting (slurmdbd) is not optional: without it sacct fails, and submitit cannot
# tell that a cancelled job ended.
set -euo pipefail

CLUSTER=${SLURM_CLUSTER_NAME:-dcl}
CPUS=${SLURM_NODE_CPUS:-$(nproc)}
MEMORY_MB=${SLURM_NODE_MEMORY_MB:-$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))}
ETC=/etc/slurm
STATE=/var/lib/slurm
DB_PASSWORD=${SLURM_DB_PASSWORD:-slurmdbd-local}

log() { echo "[local-cluster] $*" >&2; }

PROGRAMS=(slurmctld slurmd slurmdbd sbatch sacct munged mysqld_safe)

install_packages() {
    local missing=()
    for program in "${PROGRAMS[@]}"; do
        command -v "$program" >/dev/null || [ -x "/usr/sbin/$program" ] || missing+=("$program")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "already installed"
        return 0
    fi
    log "installing (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurmctld slurmd slurm-client slurmdbd munge mariadb-server
}

write_configs() {
    mkdir -p "$ETC" "$STATE/ctld" "$STATE/d" /var/log/slurm /run/munge
    local previous=""
    [ -f "$ETC/slurm.conf" ] && previous=$(cat "$ETC/slurm.conf")
    cat > "$ETC/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MinJobAge=300
# A requeued or cancelled job gets SIGTERM, then SIGKILL after KillWait seconds. submitit
# ignores SIGTERM, so a short wait stops an interrupted test job quickly (clusters often use 30).
KillWait=5
JobRequeue=1
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEMORY_MB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    cat > "$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
PidFile=/run/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
EOF
    chmod 600 "$ETC/slurmdbd.conf"
    [ "$previous" = "$(cat "$ETC/slurm.conf")" ] || CONFIG_CHANGED=1
}

start_munge() {
    chown munge:munge /run/munge
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
    fi
}

start_mariadb() {
    if ! mysqladmin ping >/dev/null 2>&1; then
        mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
        (mysqld_safe --bind-address=127.0.0.1 >/dev/null 2>&1 &)
        for _ in $(seq 60); do mysqladmin ping >/dev/null 2>&1 && break; sleep 0.5; done
    fi
    mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

wait_for() {
    local what=$1 tries=$2; shift 2
    for _ in $(seq "$tries"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    log "timed out waiting for $what; see /var/log/slurm/"
    return 1
}

running() {
    [ -s "/run/$1.pid" ] && kill -0 "$(cat "/run/$1.pid")" 2>/dev/null
}

start() {
    CONFIG_CHANGED=0
    write_configs
    start_munge
    start_mariadb
    running slurmdbd || slurmdbd
    wait_for slurmdbd 60 sacctmgr -n list cluster
    sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
    if running slurmctld && [ "$CONFIG_CHANGED" = 1 ]; then
        log "slurm.conf changed; telling the running daemons to reread it"
        scontrol reconfigure
    fi
    running slurmctld || slurmctld
    wait_for slurmctld 60 sinfo
    running slurmd || slurmd -N localhost
    wait_for "an idle node" 60 status
    log "cluster $CLUSTER is up: $(sinfo -h -o '%P %D %t %c CPUs')"
}

status() {
    sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'
}

stop() {
    for daemon in slurmd slurmctld slurmdbd; do
        if [ -s "/run/$daemon.pid" ]; then
            kill "$(cat "/run/$daemon.pid")" 2>/dev/null || true
            rm -f "/run/$daemon.pid"
        fi
    done
    mysqladmin shutdown >/dev/null 2>&1 || true
    log "stopped"
}

case "${1:-}" in
    install) install_packages ;;
    start) start ;;
    status) status ;;
    stop) stop ;;
    *) echo "usage: $0 install|start|status|stop" >&2; exit 2 ;;
esac
