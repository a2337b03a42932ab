import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # dist_harness, tiny_models

import eglp_dist  # noqa: E402,F401  (applies the torchvision shim before any test imports timm)
import torch  # noqa: E402

torch.set_num_threads(1)
