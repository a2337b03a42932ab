#!/usr/bin/env bash
# Training under torchrun, on one node or several (run this script once per node).
#   launch/torchrun.sh configs/eglp/city2acdc.yaml trainer.max_iters=40000
#   NNODES=2 MASTER_ADDR=node0 launch/torchrun.sh configs/eglp/city2acdc.yaml   # on every node
# Environment: NPROC (default: the node's GPUs, else 2 CPU processes), NNODES (1),
# MASTER_ADDR (127.0.0.1; the rendezvous host), MASTER_PORT (29500), MAX_RESTARTS (3),
# RUN_ID (the rendezvous id; same on every node, default eglp), RDZV_CONF (extra c10d
# rendezvous settings, e.g. is_host=1 on the node that serves the rendezvous when torchrun
# cannot tell from its host names, as inside network namespaces), LOCAL_ADDR (this node's
# address as the other nodes reach it, where its host name does not resolve to it there).
#
# c10d rendezvous (no fixed node ranks): a node that joins late or comes back is admitted.
# After a worker dies, torchrun restarts the whole group (up to MAX_RESTARTS) and training
# resumes from the newest complete checkpoint (trainer.resume=auto). A stop request (SIGTERM,
# SIGUSR1, SIGINT to this script, or a stop signal to any worker) is not a failure: every rank
# checkpoints, nothing restarts, the script exits 75 (launch/supervise.sh). Each restart gets its
# own TCP store: with the store shared between the rendezvous and the workers, a restarted
# gloo group intermittently fails to connect or hangs (pytorch#135712, #167288).
set -euo pipefail
config=${1:?usage: launch/torchrun.sh CONFIG [KEY=VALUE ...]}; shift
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true); [ "${NPROC:-0}" -gt 0 ] || NPROC=2
fi
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
source "$(dirname "${BASH_SOURCE[0]}")/supervise.sh"
supervise "${PYTHON:-python}" -m torch.distributed.run --nnodes "${NNODES:-1}" --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
  --rdzv-id "${RUN_ID:-eglp}" --max-restarts "${MAX_RESTARTS:-3}" ${RDZV_CONF:+--rdzv-conf "$RDZV_CONF"} \
  ${LOCAL_ADDR:+--local-addr "$LOCAL_ADDR"} \
  -m eglp_dist train "$config" trainer.resume=auto "$@"
