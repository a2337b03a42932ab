#!/usr/bin/env bash
# Launch training with torchrun on this node (or, with NNODES>1, on each node in turn).
#   launch/torchrun.sh configs/eglp/city2acdc.yaml trainer.max_iters=40000
# Environment: NPROC (default: number of GPUs, else 2 CPU processes), NNODES (1),
# NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500).
set -euo pipefail
config=${1:?usage: launch/torchrun.sh CONFIG [KEY=VALUE ...]}; shift
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l); [ "$NPROC" -gt 0 ] || NPROC=2
fi
exec torchrun --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$NPROC" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  -m eglp_dist train "$config" "$@"
