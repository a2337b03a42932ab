import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # dist_harness, tiny_models

import eglp_dist  # noqa: E402,F401  (applies the torchvision shim before any test imports timm)
import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """The demo's synthetic shards, small (8 train, 4 val images of 128x64), made once for
    the multi-process training tests (guard, resume, launchers, SLURM, two nodes)."""
    from eglp_dist.demo import prepare_data

    return prepare_data(tmp_path_factory.mktemp("tiny_data"), n_train=8, n_val=4, size=(128, 64))


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """The demo's synthetic shards at 256x128 (8 train, 5 val images: an uneven split over 2
    ranks; 6 prompts), made once for the recipes' end-to-end tests (UDA, PIG, EGLP)."""
    from eglp_dist.demo import prepare_data

    return prepare_data(tmp_path_factory.mktemp("demo_data"), n_train=8, n_val=5, size=(256, 128))
