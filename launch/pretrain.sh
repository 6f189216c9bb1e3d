#!/usr/bin/env bash
# RET-CLIP pretraining on Slurm: one `accelerate launch` per node (launch/node.sh), started by srun.
#
#   sbatch launch/pretrain.sh configs/retclip_vitb16.yaml --data.shards /data/shards
#   sbatch --nodes 4 --gpus-per-node 8 launch/pretrain.sh configs/retclip_vitb16.yaml --output_dir runs/r1
#
# The job log goes to logs/retclip-JOBID.out, appended to across requeues; Slurm does not create
# logs/, so `mkdir -p logs` first (or pass --output).
#
# Everything after the config path goes to retclip-train as overrides, and `--checkpoint.resume auto`
# is added, so a requeued job continues from its latest complete checkpoint. Environment knobs:
# GPUS_PER_NODE (training processes per node; default: Slurm's GPU count per node), ACCELERATE_CONFIG
# (default configs/accelerate/multi_node.yaml), MAIN_PORT (default 29500). On a cluster without GPUs
# (tests, launch/local_slurm.sh): sbatch --gpus-per-node=0 with GPUS_PER_NODE=2 and
# ACCELERATE_CONFIG=configs/accelerate/cpu_2proc.yaml; the trainer puts each process on the CPU itself.
#
# Time limit: Slurm signals this script (B:USR2) 120 s ahead; it sends the requeue signal to the training
# processes, which save and exit, and the job requeues itself. The requeue signal is USR2 unless
# RETCLIP_REQUEUE_SIGNAL=USR1 (retclip_dist/runtime/stop_signals.py says why USR2: NCCL 2.12 took USR1,
# submitit uses USR2, torchrun takes TERM/INT/HUP/QUIT). #SBATCH lines cannot read variables, so to
# change it, change both:
#   RETCLIP_REQUEUE_SIGNAL=USR1 sbatch --signal=B:USR1@120 launch/pretrain.sh CONFIG.yaml ...
# (This shell, node.sh and the training processes answer USR1 and USR2 alike, so a mismatch still
# saves.) A rank that stalled or lost a peer (exit codes 5 and 6: train.stall_timeout_s,
# train.collective_timeout_s) requeues the job as well, at most train.max_fault_requeues times in a row
# without a newer checkpoint (retclip_dist/launch/requeue.py). The config is checked once before srun
# (retclip-train --check): a bad one ends the job with one line and status 2. PYTHON names the
# interpreter of the environment (default: python on PATH). Preemption: Slurm sends SIGTERM to every
# process, the trainer saves, and Slurm requeues the job (PreemptMode=REQUEUE).
#SBATCH --job-name=retclip
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -uo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: sbatch launch/pretrain.sh CONFIG.yaml [--section.key value ...]" >&2
    exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Under sbatch this script runs from a spool copy; the submit directory holds launch/node.sh.
[[ -x $here/node.sh ]] || here=${SLURM_SUBMIT_DIR:-$PWD}/launch

gpus=${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}}
gpus=${gpus##*:}  # "h100:8" -> "8"
if ! [[ $gpus =~ ^[1-9][0-9]*$ ]]; then
    # Guessing one process would leave the other GPUs of the node idle without a word.
    echo "retclip: no process count per node (Slurm gave '${SLURM_GPUS_PER_NODE:-}' GPUs per node):" \
        "submit with --gpus-per-node N or set GPUS_PER_NODE" >&2
    exit 2
fi
export GPUS_PER_NODE=$gpus
export NNODES=${SLURM_NNODES:-1}
MAIN_HOST=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null | head -n 1)
export MAIN_HOST=${MAIN_HOST:-$(hostname)}
export MAIN_PORT=${MAIN_PORT:-29500}
export ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/multi_node.yaml}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# NCCL defaults that suit most InfiniBand clusters; anything already set in the environment wins.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# The requeue signal, checked (USR1 or USR2, not one NCCL_PROXY_DUMP_SIGNAL takes) and exported for
# node.sh and the trainer; its one home is retclip_dist/runtime/stop_signals.py.
RETCLIP_REQUEUE_SIGNAL=$(${PYTHON:-python} -m retclip_dist.runtime.stop_signals) || exit $?
export RETCLIP_REQUEUE_SIGNAL

# Check the config, paths and output_dir once, here, before any node starts: a bad field is one line in
# the log and exit 2, not a traceback from every process on every node.
${PYTHON:-python} -m retclip_dist.train --check --world-size "$((NNODES * GPUS_PER_NODE))" \
    --config "$@" --checkpoint.resume auto || exit $?

echo "retclip: job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}:" \
    "${NNODES} node(s) x ${GPUS_PER_NODE} process(es), main ${MAIN_HOST}:${MAIN_PORT}," \
    "requeue signal ${RETCLIP_REQUEUE_SIGNAL}"

stop_requested=0
forward_stop() {
    stop_requested=1
    echo "retclip: $1 received, asking the training processes to save and stop (${RETCLIP_REQUEUE_SIGNAL})"
    # Without --batch or --full, scancel signals every process of the job's steps, not this shell.
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        scancel --signal="${RETCLIP_REQUEUE_SIGNAL}" "${SLURM_JOB_ID}" 2>/dev/null || true
    fi
}
# Either user signal: sbatch --signal may name the other one than RETCLIP_REQUEUE_SIGNAL, and this shell
# holds no NCCL that could want it.
trap 'forward_stop USR1' USR1
trap 'forward_stop USR2' USR2
trap 'forward_stop TERM' TERM

# srun in the background so the traps run while it is going (bash defers traps during a foreground wait).
# --wait: once one node's task has ended, the others get 120 s; a frozen node (its ranks stopped, the
# other nodes' ranks gave up on it after train.collective_timeout_s) must not hold the job to its limit.
srun --kill-on-bad-exit=0 --wait=120 "$here/node.sh" --config "$@" --checkpoint.resume auto &
step=$!
wait "$step"
status=$?
while kill -0 "$step" 2>/dev/null; do  # a trap interrupted the wait; the step is still going
    wait "$step"
    status=$?
done
echo "retclip: training exited with status ${status}"

if [[ $stop_requested == 1 && -n ${SLURM_JOB_ID:-} ]]; then
    echo "retclip: requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
elif [[ $status != 0 && -n ${SLURM_JOB_ID:-} ]] &&
    ${PYTHON:-python} -m retclip_dist.launch.requeue --config "$@" --checkpoint.resume auto; then
    # A rank stalled or lost a peer (exit code 5 or 6 in its health record: torchrun's status is 1 for
    # any failure); the line above says which, and how many such requeues in a row the run has had.
    echo "retclip: requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
fi
exit "$status"
