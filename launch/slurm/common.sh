# Shared by launch/slurm/*.sbatch (sourced, not run). Two functions:
#
#   slurm_setup          cd to the repo, pick python, head node address, rendezvous port, ranks per node
#   run_preemptible ...  run a command (an srun line) under the preemption protocol below
#
# Preemption protocol. `#SBATCH --signal=B:USR1@300` makes Slurm send SIGUSR1 to THIS batch shell
# 300 s before the time limit. The trap forwards it to the srun step (`kill -USR1 $srun_pid`); srun
# forwards it to every process of the step on every node. The training ranks then finish their
# current step, agree through the step's all-reduce, save an atomic checkpoint and exit 3
# (simpo_ds.cli.EXIT_PREEMPTED). Launchers must survive the signal and wait for them:
#   - torchrun: `--signals_to_handle ...,SIGUSR1 --shutdown_timeout N`: it forwards the signal to its
#     workers and waits N s for them (then SIGKILL). Without SIGUSR1 in the list it would die of it.
#   - deepspeed launcher: it dies on SIGUSR1 (default action) and answers SIGTERM by killing its ranks
#     after 30 s. So its srun task ignores SIGUSR1 (`trap '' USR1`, inherited by the launcher; the
#     ranks install their own handler) and the ranks get the signal straight from Slurm.
# When the step has ended after a signal and did not succeed, the job requeues itself
# (`scontrol requeue`): the new run passes `--resume_from_checkpoint auto` and goes on from `latest`.
# SIGTERM (scancel, preemption by a higher-priority job, the time limit itself) is delivered by Slurm
# to every process of the job, so the trap only records it (forwarding would signal torchrun twice,
# and a second signal aborts its graceful wait); Slurm kills KillWait (30 s by default) later.

slurm_setup() {
    cd "${SIMPO_DIR:-$PWD}"
    PYTHON=${PYTHON:-$(command -v python || command -v python3)}
    # The first node of the allocation hosts the rendezvous; a port derived from the job id, so
    # that two jobs sharing a node do not collide.
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}
    NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    NPROC_PER_NODE=${NPROC_PER_NODE:-$(gpus_per_node)}
    if [[ $NPROC_PER_NODE == 0 ]]; then  # no GPU: CPU ranks (DeepSpeed's CPU accelerator, gloo)
        NPROC_PER_NODE=${CPU_RANKS_PER_NODE:-1}
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_ON_NODE:-$NPROC_PER_NODE} / NPROC_PER_NODE ))}
    fi
    # How long torchrun waits for its ranks after a signal: a step + a checkpoint must fit, and it must
    # end before the time limit (the --signal lead time).
    SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-270}
    # JIT-compiled DeepSpeed ops go to a LOCAL disk: their lock files hang on shared filesystems.
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/${USER:-$(id -un)}/torch_extensions}
    # srun (22.05+) does not inherit --cpus-per-task from sbatch: pass it, or every rank shares one core
    CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
    export MASTER_ADDR MASTER_PORT NNODES NPROC_PER_NODE PYTHON SHUTDOWN_TIMEOUT CPUS_PER_TASK
    echo "simpo-ds: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $NNODES node(s) x $NPROC_PER_NODE rank(s)," \
        "rendezvous $MASTER_ADDR:$MASTER_PORT"
}

gpus_per_node() {
    # Slurm's view first (--gpus-per-node / --gres=gpu:N), then what the node shows, else 0.
    local n=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
    n=${n##*:}  # "a100:8" -> "8"
    if [[ -z $n && -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != NoDevFiles ]]; then
        n=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
    fi
    if [[ -z $n ]] && command -v nvidia-smi >/dev/null; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    echo "${n:-0}"
}

# Training arguments of a (re)started job: resume from `latest` when a checkpoint exists, unless the
# caller chose a checkpoint explicitly.
resume_args() {
    local arg
    for arg in "$@"; do
        [[ $arg == --resume_from_checkpoint* ]] && return 0
    done
    echo "--resume_from_checkpoint auto"
}

run_preemptible() {
    local signalled="" pid="" rc
    trap 'signalled=USR1; echo "simpo-ds: SIGUSR1: asking the ranks to checkpoint and stop"; kill -USR1 "$pid" 2>/dev/null || true' USR1
    trap 'signalled=TERM; echo "simpo-ds: SIGTERM (Slurm signals every process of the job)"' TERM
    "$@" &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do  # `wait` returns early whenever a trapped signal arrives
        wait "$pid" || true
    done
    rc=0
    wait "$pid" || rc=$?  # bash keeps the exit status of a finished background job
    trap - USR1 TERM
    if [[ -n $signalled && $rc != 0 ]]; then
        echo "simpo-ds: stopped by SIG$signalled (exit $rc): requeueing job $SLURM_JOB_ID to resume from the last checkpoint"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$rc"
}
