"""Make ``import torchvision`` work on a CPU-only torch.

The PyPI torchvision 0.28.0 wheel is built against CUDA torch. On a CPU build of torch its
compiled extension ``torchvision/_C.so`` cannot be loaded, and torchvision's
``_meta_registrations`` then fails at import with
``RuntimeError: operator torchvision::nms does not exist`` because it registers fake
kernels for ``nms`` and ``qnms`` without checking that the ops exist (its other
registrations are guarded). ``import timm`` fails with it.

When (and only when) the compiled ops cannot be loaded, we define those two schemas
ourselves (``torch.ops.torchvision.nms`` gets a plain-torch CPU kernel), so torchvision
imports. ``torchvision.ops`` still refuses to run without its extension, as it should. Where the extension loads (GPU machines, matching builds) this module does nothing.
Nothing in eglp_dist needs torchvision's detection ops; this only unblocks the import.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

# The ops torchvision's _meta_registrations.py registers fake kernels for unconditionally.
_UNGUARDED_OPS = ("nms", "qnms")
_SCHEMA = "{}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_LIBRARY = None  # keeps the torch.library.Library alive: dropping it unregisters the op
STATUS = "not-needed"


def _extension_loads() -> bool:
    """True if torchvision's compiled ops load into this torch (without importing torchvision)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # torchvision absent: nothing to patch
    pkg_dir = list(spec.submodule_search_locations)[0]
    candidates = [f for f in os.listdir(pkg_dir) if f.startswith("_C") and f.endswith(".so")]
    if not candidates:
        return False
    try:
        torch.ops.load_library(os.path.join(pkg_dir, candidates[0]))
    except (OSError, RuntimeError):
        return False
    return True


def _nms_cpu(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS over (x1, y1, x2, y2) boxes; returns kept indices by decreasing score."""
    order = scores.argsort(descending=True)
    x1, y1, x2, y2 = dets.unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    keep = []
    suppressed = torch.zeros(dets.shape[0], dtype=torch.bool)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas - inter).clamp(min=1e-12)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.int64)


def apply() -> str:
    """Register the missing op if needed. Returns 'not-needed', 'patched' or 'already-imported'."""
    global _LIBRARY, STATUS
    if "torchvision" in sys.modules:
        STATUS = "already-imported"
        return STATUS
    if _extension_loads():
        STATUS = "not-needed"
        return STATUS
    missing = [op for op in _UNGUARDED_OPS if not hasattr(torch.ops.torchvision, op)]
    if missing:
        _LIBRARY = torch.library.Library("torchvision", "DEF")
        for op in missing:
            _LIBRARY.define(_SCHEMA.format(op))
        if "nms" in missing:
            _LIBRARY.impl("nms", _nms_cpu, "CPU")
    STATUS = "patched"
    return STATUS


apply()


def _check() -> int:
    """`python -m eglp_dist.compat`: used by `make setup` to prove the stack imports."""
    import timm  # noqa: F401
    import torchvision

    print(f"torch {torch.__version__} (cuda {torch.version.cuda}), torchvision "
          f"{torchvision.__version__}, timm {timm.__version__}, compat shim: {STATUS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_check())
