#!/usr/bin/env bash
# Train on several machines with torchrun and a c10d rendezvous. Run THE SAME command on every
# machine (the order they start in does not matter; they wait for each other):
#
#   MASTER_ADDR=node0.cluster NNODES=2 NPROC_PER_NODE=8 \
#       scripts/launch/torchrun_multi_node.sh configs/pretrain/minilm.yaml run.dir=/shared/runs/m
#
# MASTER_ADDR      host name or IP of one of the machines (it hosts the rendezvous store)   required
# MASTER_PORT      a free TCP port on MASTER_ADDR (default 29500)
# NNODES           number of machines (default 1); "MIN:MAX" allows elastic membership
# NPROC_PER_NODE   processes per machine (default: its GPU count)
# RDZV_ID          a job id shared by all machines of this run (default mm-$MASTER_PORT);
#                  change it between jobs that reuse the same MASTER_ADDR:MASTER_PORT
# NODE_RANK        not needed: c10d assigns ranks. (With RDZV_BACKEND=static it is required.)
# MAX_RESTARTS     restart all workers this many times after a failure (default 0); they resume
#                  from the newest complete checkpoint, as `mm train` does on a second start.
# FSDP             1: FSDP2 instead of DDP (default 0)
#
# run.dir (and the data) must be on a file system every machine sees: rank 0 writes the config,
# the tokenizer and the checkpoints there, and every rank reads them back on resume.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: MASTER_ADDR=HOST NNODES=N $0 CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
: "${MASTER_ADDR:?set MASTER_ADDR to the host name or IP of one of the machines}"
PYTHON=${PYTHON:-python}
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=${NNODES:-1}
RDZV_ID=${RDZV_ID:-mm-$MASTER_PORT}
RDZV_BACKEND=${RDZV_BACKEND:-c10d}
MAX_RESTARTS=${MAX_RESTARTS:-0}
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 1)")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

source "$(dirname "$0")/fsdp_env.sh"  # FSDP=1: FSDP2 instead of DDP

extra=()
if [ "$RDZV_BACKEND" = "static" ]; then
    : "${NODE_RANK:?the static rendezvous needs NODE_RANK (0 on MASTER_ADDR, then 1, 2, ...)}"
    extra=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
fi

exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend "$RDZV_BACKEND" --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
    --max-restarts "$MAX_RESTARTS" "${extra[@]}" \
    -m mm train "$@"
