"""torchvision/timm must import on this machine whatever torchvision wheel is installed."""
import subprocess
import sys

import torch


def test_timm_and_torchvision_import_in_a_fresh_process():
    code = "import eglp_dist, timm, torchvision; from eglp_dist import compat; print(compat.STATUS)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in {"patched", "not-needed"}


def test_registered_nms_kernel_is_correct_where_patched():
    import torchvision  # noqa: F401  (after eglp_dist, via conftest)
    from eglp_dist import compat

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 9, 10]], dtype=torch.float)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    keep = torch.ops.torchvision.nms(boxes, scores, 0.5)
    # box 3 (0.95) suppresses 0 (IoU 0.9) and 1; box 2 is disjoint
    assert keep.tolist() == [3, 2]
    assert compat.STATUS in {"patched", "not-needed"}
