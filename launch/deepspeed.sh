#!/usr/bin/env bash
# Training under the DeepSpeed launcher (it sets RANK/WORLD_SIZE/... and passes --local_rank=N).
#   launch/deepspeed.sh configs/eglp/city2acdc.yaml engine=zero2
# One node: NPROC processes (default: the node's GPUs, else 2 CPU processes). The launcher
# must be told: without --num_gpus it starts a single process on a machine without GPUs.
# Several nodes: HOSTFILE=launch/hostfile.example (one "host slots=N" line per node, ssh).
# A stop request (SIGTERM, SIGUSR1, SIGINT to this script, or a stop signal to any worker):
# every rank checkpoints, the script exits 75 (launch/supervise.sh). On several nodes the
# remote workers are the launcher's (pdsh): signal them, or this script on the first node.
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
source "$(dirname "${BASH_SOURCE[0]}")/supervise.sh"
supervise "${DEEPSPEED:-deepspeed}" "${args[@]}" --master_port "${MASTER_PORT:-29500}" \
  --module eglp_dist train "$config" trainer.resume=auto "$@"
