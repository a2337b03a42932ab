#!/usr/bin/env bash
# The GPU check on a bare GPU host: a venv over the host's own torch (--system-site-packages),
# the kit of `make gpu-kit` (tools/gpu_kit.py) installed from its folder with no registry, and
# tools/gpu_check.py run; its table and JSON under $OUT/gpu_check.
#
#   tools/gpu_run.sh [gpu_check.py arguments]       (e.g. --dry-run)
#
# KIT (build/gpu-kit), OUT (runs), PYTHON (python3) and VENV (build/gpu-venv) may be set; an
# existing VENV is used as it is (the tests give one that holds a host's packages only).
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${KIT:-build/gpu-kit}
OUT=${OUT:-runs}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-build/gpu-venv}
if [ ! -f "$KIT/CONTENTS" ]; then
  echo "gpu_run: no kit in $KIT: run 'make gpu-kit' where the package registry is reachable and carry $KIT" >&2
  exit 2
fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV"
# every wheel of the kit, nothing from an index; their own requirements are in the kit or on the host
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-index --no-deps "$KIT"/*.whl
"$VENV/bin/python" -m pip check || echo "gpu_run: pip check reports the above (not fatal: gpu_check is the test)"
"$VENV/bin/python" -c "import torch; print(f'gpu_run: torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs {torch.cuda.device_count()}')"
"$VENV/bin/python" tools/gpu_check.py --out "$OUT/gpu_check" "$@"
echo "gpu_run: done in $(( $(date +%s) - start )) s"
