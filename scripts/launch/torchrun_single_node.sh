#!/usr/bin/env bash
# Train on all GPUs (or N CPU processes) of ONE machine with torchrun.
#
#   scripts/launch/torchrun_single_node.sh CONFIG.yaml [key=value ...]
#   NPROC_PER_NODE=4 scripts/launch/torchrun_single_node.sh configs/pretrain/shapes.yaml run.dir=runs/p4
#
# NPROC_PER_NODE   processes to start (default: number of visible GPUs, or 2 on a CPU machine)
# OMP_NUM_THREADS  CPU threads per process (default 1 when there are GPUs, else cores / processes)
# FSDP             1: FSDP2 instead of DDP (default 0)
# Runs resume: start the same command again after a stop (train.batch_size is per process).
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
PYTHON=${PYTHON:-python}
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
NPROC_PER_NODE=${NPROC_PER_NODE:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 2)}
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    CORES=$(nproc)
    if [ "$GPUS" -gt 0 ]; then export OMP_NUM_THREADS=1
    else export OMP_NUM_THREADS=$(( CORES / NPROC_PER_NODE > 0 ? CORES / NPROC_PER_NODE : 1 )); fi
fi

source "$(dirname "$0")/fsdp_env.sh"  # FSDP=1: FSDP2 instead of DDP

# --standalone: a private rendezvous on a free local port (two jobs on one machine do not clash).
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$NPROC_PER_NODE" \
    -m mm train "$@"
