"""Fusion of the two teachers' pseudo-labels by class similarity (PIG; EGLP's FIS and DMS
build on it).

PIG (``dacs.py``): per target image, the ``k`` classes whose similarity score says "least
alike between day and night" are selected; wherever the NFNet teacher predicts a selected
class its label replaces the UDA teacher's, except where the UDA teacher predicts a
protected class (small, rare objects the few prompts seldom show). The confidence weight
stays the UDA teacher's.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def top_k_classes(scores: Tensor, k: int) -> Tensor:
    """(B, K) scores (larger = less similar; 0 = class absent) -> (B, K) bool: each image's
    ``k`` largest positive scores."""
    k = min(k, scores.shape[1])
    idx = scores.topk(k, dim=1).indices
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
    return chosen & (scores > 0)


def fuse_labels(uda: Tensor, night: Tensor, selected: Tensor, protected: Sequence[int]) -> Tensor:
    """(B, H, W) labels of the UDA and NFNet teachers, (B, K) selected classes -> the fused
    (B, H, W) label: NFNet's where it predicts a selected class and UDA's is not protected."""
    b, k = selected.shape
    take = selected.gather(1, night.reshape(b, -1).clamp(0, k - 1)).view_as(night)
    prot = torch.zeros(256, dtype=torch.bool, device=uda.device)
    if len(protected):
        prot[torch.as_tensor(list(protected), device=uda.device)] = True
    take = take & (night < k) & ~prot[uda.clamp(0, 255)]
    return torch.where(take, night, uda)
