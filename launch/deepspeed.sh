#!/usr/bin/env bash
# Training under the DeepSpeed launcher (it sets RANK/WORLD_SIZE/... and passes --local_rank=N).
#   launch/deepspeed.sh configs/eglp/city2acdc.yaml engine=zero2
# One node: NPROC processes (default: the node's GPUs, else 2 CPU processes). The launcher
# must be told: without --num_gpus it starts a single process on a machine without GPUs.
# Several nodes: HOSTFILE=launch/hostfile.example (one "host slots=N" line per node, ssh).
set -euo pipefail
config=${1:?usage: launch/deepspeed.sh CONFIG [KEY=VALUE ...]}; shift
args=()
if [ -n "${HOSTFILE:-}" ]; then
  args+=(--hostfile "$HOSTFILE")
else
  if [ -z "${NPROC:-}" ]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true); [ "${NPROC:-0}" -gt 0 ] || NPROC=2
  fi
  args+=(--num_gpus "$NPROC")
fi
exec "${DEEPSPEED:-deepspeed}" "${args[@]}" --master_port "${MASTER_PORT:-29500}" \
  --module eglp_dist train "$config" trainer.resume=auto "$@"
