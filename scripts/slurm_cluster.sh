#!/usr/bin/env bash
# A one-node Slurm cluster on localhost, for testing launch/slurm/*.sbatch (CI, laptops).
#
#   bash scripts/slurm_cluster.sh install        # apt-get: slurmctld slurmd slurm-client munge (root)
#   bash scripts/slurm_cluster.sh up   DIR       # private munged + slurmctld + slurmd, state in DIR
#   export SLURM_CONF=DIR/slurm.conf             # then sbatch/squeue/scontrol talk to it
#   bash scripts/slurm_cluster.sh down DIR       # stops the three daemons (by their pid files)
#
# Everything lives in DIR (config, munge key and socket, state, logs, pid files): nothing in /etc is
# touched and the daemons use free ports, so it can run beside a real Slurm or another test. Needs
# root (slurmd starts jobs as their user). CPUS (default 2) is the node's CPU count.
set -euo pipefail

cmd=${1:?usage: slurm_cluster.sh install|up DIR|down DIR}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2; shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then echo "slurm_cluster: timed out waiting for $what" >&2; return 1; fi
        sleep 0.5
    done
}

case "$cmd" in
install)
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        exit 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    ;;
up)
    dir=$(mkdir -p "${2:?DIR}" && cd "$2" && pwd)
    mkdir -p "$dir"/{state,spool,log,munge}
    chmod 700 "$dir/munge"
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.sock" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"
    wait_for 10 munged munge --socket="$dir/munge/munge.sock" --no-input
    cat >"$dir/slurm.conf" <<CONF
ClusterName=simpo-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long Slurm holds a requeued job before restarting it (default 120 s)
AuthInfo=socket=$dir/munge/munge.sock,cred_expire=${CRED_EXPIRE:-10}
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
# no cgroups in containers: track a job's processes through /proc, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=${CPUS:-2} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF" -N localhost
    wait_for 30 "the node to become idle" bash -c 'sinfo -h -N -o %t | grep -qx idle'
    echo "export SLURM_CONF=$SLURM_CONF"
    ;;
down)
    dir=${2:?DIR}
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        [[ -s $pidfile ]] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    done
    ;;
*)
    echo "usage: slurm_cluster.sh install|up DIR|down DIR" >&2
    exit 2
    ;;
esac
