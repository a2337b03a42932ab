# Sourced by launch/torchrun.sh and launch/deepspeed.sh: `supervise LAUNCHER ARGS...` runs the
# launcher so that a stop request stops the job, with exit 75, under either launcher.
#
# Why: a worker that stopped on request (every rank at one step boundary, after a checkpoint)
# and exits 75 is a failed worker to torchrun, which restarts the group and trains on; the
# DeepSpeed launcher kills the other workers when one exits non-zero; and a SIGTERM to either
# launcher's own process ends it through its handler (torchrun: a traceback, exit 1). So:
# * the launcher runs in its own session: a signal to this script, or Ctrl-C in its terminal,
#   reaches this script only, never the launcher's processes;
# * SIGTERM, SIGINT, SIGHUP and SIGUSR1 to this script become a stop request: written to
#   $EGLP_LAUNCH_DIR/requested, and forwarded (SIGUSR1 as itself, the others as SIGTERM) to
#   the workers that registered there (eglp_dist/control.py: once their stop signals are
#   caught; one that registers later reads the request);
# * a worker that stopped on request leaves $EGLP_LAUNCH_DIR/stopped and exits 0, so the
#   launcher ends normally, and this script exits 75. A signal sent to a worker directly (by
#   a scheduler, or `kill`) stops every rank the same way.
# The folder is node-local (one per script, removed at exit): several nodes need no shared
# file system for it; each node's script sees its own workers' mark.
supervise() {
  EGLP_LAUNCH_DIR=$(mktemp -d "${TMPDIR:-/tmp}/eglp_launch.XXXXXX")
  export EGLP_LAUNCH_DIR
  trap 'rm -rf "$EGLP_LAUNCH_DIR"' EXIT
  local sig child rc
  set +e  # the launcher's status is this function's to judge
  for sig in TERM INT HUP USR1; do
    trap "_eglp_stop_request $sig" "$sig"
  done
  setsid "$@" &
  child=$!
  wait_for_exit "$child"; rc=$?
  if [ -e "$EGLP_LAUNCH_DIR/stopped" ]; then
    echo "launch: stopped at a checkpoint on request; exit 75 (run again to continue)" >&2
    exit 75  # eglp_dist.control.EXIT_PREEMPTED
  fi
  exit "$rc"
}

# The exit status of background process $1, waiting through the traps that interrupt `wait`.
wait_for_exit() {
  local rc
  while :; do
    wait "$1"; rc=$?
    # a trapped signal interrupts `wait` (status > 128) while the process runs on
    if [ "$rc" -gt 128 ] && kill -0 "$1" 2>/dev/null; then continue; fi
    return "$rc"
  done
}

_eglp_stop_request() {
  local received=$1 forward=TERM worker
  [ "$received" = USR1 ] && forward=USR1
  echo "SIG$forward" > "$EGLP_LAUNCH_DIR/requested"
  echo "launch: SIG$received received: stop requested (every rank checkpoints, then the job ends with 75)" >&2
  for worker in "$EGLP_LAUNCH_DIR"/worker.*; do
    [ -e "$worker" ] && kill -s "$forward" "${worker##*.}" 2>/dev/null
  done
  return 0
}
