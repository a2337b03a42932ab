"""NFNet's training images (PIG): the prompt crop itself, and the "dark mix".

Dark mix (PIG ``dacs.py``): the left or the right half (drawn per image from the method's
generator) of the prompt crop is pasted at the same place onto the target crop; the label is
the prompt's ground truth on the pasted half and the fused pseudo-label elsewhere, with no
pixel weights and no margin mask. On even iterations it is used as is (PMS); on odd ones
its 64-pixel blocks are hidden at ratio 0.7 (AMS), hidden pixels set to 0.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from eglp_dist.device_constants import to_device_async


def half_masks(batch: int, height: int, width: int, generator: torch.Generator, device) -> Tensor:
    """(B, 1, H, W) bool: the left half (columns < W//2) or the right half, per image."""
    right = to_device_async(torch.rand(batch, generator=generator) < 0.5, device)
    left_half = torch.arange(width, device=device).view(1, 1, 1, width) < width // 2
    mask = torch.where(right.view(batch, 1, 1, 1), ~left_half, left_half)
    return mask.expand(batch, 1, height, width)


def dark_mix(prompt_img: Tensor, prompt_seg: Tensor, tgt_img: Tensor, tgt_label: Tensor,
             generator: torch.Generator) -> Tuple[Tensor, Tensor, Tensor]:
    """(image, label, pasted-half mask) of the dark mix; shapes as the target's."""
    b, _, h, w = tgt_img.shape
    if prompt_img.shape != tgt_img.shape:
        raise ValueError(f"dark mix needs prompt and target crops of one shape, got "
                         f"{tuple(prompt_img.shape)} and {tuple(tgt_img.shape)}")
    mask = half_masks(b, h, w, generator, tgt_img.device)
    img = torch.where(mask, prompt_img, tgt_img)
    seg = torch.where(mask[:, 0], prompt_seg, tgt_label)
    return img, seg, mask[:, 0]


def uses_ams(it: int) -> bool:
    """PIG alternates: even iterations PMS (the mix as is), odd iterations AMS (masked)."""
    return it % 2 == 1
