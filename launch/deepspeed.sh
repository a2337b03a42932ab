#!/usr/bin/env bash
# Launch training with the DeepSpeed launcher (it passes --local_rank=N and sets RANK etc.).
#   launch/deepspeed.sh configs/eglp/city2acdc.yaml engine=zero2
# Multi-node: HOSTFILE=launch/hostfile.example (one "host slots=N" line per node, ssh access).
set -euo pipefail
config=${1:?usage: launch/deepspeed.sh CONFIG [KEY=VALUE ...]}; shift
args=()
if [ -n "${HOSTFILE:-}" ]; then args+=(--hostfile "$HOSTFILE"); else args+=(--num_gpus "${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}"); fi
exec deepspeed "${args[@]}" --master_port "${MASTER_PORT:-29500}" --module eglp_dist train "$config" "$@"
