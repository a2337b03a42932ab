"""What the user sees: global loss averages and the TensorBoard picture grid."""
import numpy as np
import torch

from dist_harness import run_ranks
from eglp_dist.data.labels import PALETTE
from eglp_dist.logging import Monitor, image_grid

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def test_image_grid_denormalises_images_and_colours_labels():
    rgb = torch.tensor([10.0, 200.0, 90.0])
    img = ((rgb - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    seg = torch.full((1, 4, 4), 13, dtype=torch.long)  # car, at half size: resized to the image
    seg[0, 0, 0] = 255
    grid = image_grid({"src_seg": seg, "src_img": img}, MEAN, STD)
    assert grid.shape == (8, 8 + 4 + 8, 3) and grid.dtype == np.uint8
    assert (np.abs(grid[:, :8].astype(int) - rgb.numpy().astype(int)) <= 1).all()  # image first (GRID_ORDER)
    assert (grid[2:, 14:] == np.array(PALETTE[13], dtype=np.uint8)).all()
    assert (grid[:2, 12:14] == 0).all()  # ignore is black
    assert (grid[:, 8:12] == 255).all()  # white gap


def _flush(env, tmp):
    mon = Monitor(tmp, env.is_main, start=0, max_iters=10, images_per_iter=4)
    for step in range(2):
        mon.accumulate({"src.loss_seg": torch.tensor(float(env.rank + 1 + step))})
    values = mon.flush(2)
    mon.close()
    return values


def test_flush_averages_over_steps_and_ranks(tmp_path):
    a, b = run_ranks(_flush, 2, args=(str(tmp_path),))
    # rank 0 logged 1, 2; rank 1 logged 2, 3 -> 2.0 everywhere
    assert a["src.loss_seg"] == b["src.loss_seg"] == 2.0
    assert a["time/images_per_s"] > 0
    assert list(tmp_path.glob("tb/events.out.tfevents.*"))  # rank 0 wrote TensorBoard
