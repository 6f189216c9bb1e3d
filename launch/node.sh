#!/usr/bin/env bash
# One node's share of a Slurm job: started once per node by launch/pretrain.sh through srun.
# Reads the layout that pretrain.sh exported and Slurm's SLURM_NODEID; arguments go to retclip-train.
# No --cpu switch on purpose: `accelerate launch --cpu` starts a single process whatever the config says,
# while the trainer already runs each process on the CPU when the node has no GPU (retclip_dist/runtime/env.py).
set -euo pipefail

# Only the training processes act on the stop signals, SIGTERM and both user signals (the requeue signal
# that pretrain.sh sends is one of them: retclip_dist/runtime/stop_signals.py): they save, then exit. The
# launcher ignores them so it cannot die mid-save; an ignored signal stays ignored across exec, and
# Python's handlers in the trainer override it. (torchrun's agent still takes SIGTERM: it passes it on
# to the ranks and kills them 30 s later.)
trap '' USR1 USR2 TERM
exec accelerate launch --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$NNODES" --machine_rank "${SLURM_NODEID:-0}" \
    --num_processes "$((NNODES * GPUS_PER_NODE))" \
    --main_process_ip "$MAIN_HOST" --main_process_port "$MAIN_PORT" \
    -m retclip_dist.train "$@"
