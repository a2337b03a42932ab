"""MIC's block mask for masked image consistency (Hoyer et al., CVPR 2023).

MIC (``seg/mmseg/models/utils/masking_transforms.py``, ``BlockMaskGenerator.generate_mask``):

    mshape = B, 1, round(H / mask_block_size), round(W / mask_block_size)
    input_mask = (torch.rand(mshape) > mask_ratio).float()
    input_mask = resize(input_mask, size=(H, W))          # mmseg resize: mode='nearest'
    masked_img = imgs * input_mask

so a block is visible (1) with probability ``1 - mask_ratio`` (0.3 with MIC's 0.7) and hidden
(0) otherwise, and the masked image is the normalised image times the mask (hidden pixels
become 0, i.e. the dataset mean colour). With H, W multiples of the block size (MIC's 512
and 1024 crops with 64-pixel blocks) the blocks are exact ``block_size`` squares.

We follow MIC for other sizes too: the grid has ``round(H / block_size)`` rows (python's
round, half to even, as MIC) and is stretched to (H, W) by nearest-neighbour interpolation, so
blocks are then only about ``block_size`` tall and wide (not a block_size grid cropped at the
border). Deliberate differences: the uniforms come from an explicit ``torch.Generator``, and
the grid has at least one row and column (MIC's ``round`` gives 0 below half a block and its
``resize`` fails).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from eglp_dist.device_constants import to_device_async


@torch.no_grad()
def block_mask(batch: int, height: int, width: int, block_size: int = 64, ratio: float = 0.7,
               generator: torch.Generator = None, device=None) -> Tensor:
    """Random block mask: 1 = visible (probability ``1 - ratio`` per block), 0 = hidden.

    Args:
        batch, height, width: mask size (B, 1, H, W).
        block_size: block side in pixels (MIC ``mask_block_size``, 64).
        ratio: probability that a block is hidden (MIC ``mask_ratio``, 0.7);
            a block is visible iff its uniform ``U > ratio``.
        generator: required; ``batch * rows * cols`` uniforms are drawn from it.
        device: where the mask is returned (default: the generator's device).

    Returns:
        (B, 1, H, W) float32 mask of 0 and 1.
    """
    if generator is None:
        raise ValueError("block_mask needs an explicit torch.Generator")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    rows = max(1, round(height / block_size))
    cols = max(1, round(width / block_size))
    u = torch.rand((batch, 1, rows, cols), generator=generator, device=generator.device)
    grid = (u > ratio).to(torch.float32)
    if device is not None:
        grid = to_device_async(grid, device)
    return F.interpolate(grid, size=(height, width), mode="nearest")
