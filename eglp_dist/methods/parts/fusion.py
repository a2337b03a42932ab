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

from eglp_dist.device_constants import class_mask, to_device_async


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
    prot = class_mask(protected, 256, uda.device)
    take = take & (night < k) & ~prot[uda.clamp(0, 255)]
    return torch.where(take, night, uda)


# ------------------------------------------------------------------------------ EGLP: FIS

def fis_classes(dnis: Tensor, seen: Tensor, mode: str, k: int, threshold: float,
                protected: Sequence[int]) -> Tensor:
    """(K,) bool: the classes whose pseudo-label NFNet gives (EGLP's FIS): the ``k`` seen,
    unprotected classes of lowest DNIS (``bottom_k``) or every seen, unprotected class with
    DNIS < ``threshold``; protected classes stay the UDA teacher's."""
    allowed = seen & ~class_mask(protected, seen.numel(), seen.device)
    if mode == "bottom_k":
        score = torch.where(allowed, dnis, torch.full_like(dnis, float("inf")))
        idx = score.topk(min(k, int(score.numel())), largest=False).indices
        return torch.zeros_like(seen).index_fill_(0, idx, True) & allowed
    return allowed & (dnis < threshold)


# ------------------------------------------------------------------------------ EGLP: DMS

def dms_weights(dnis: Tensor, seen: Tensor, gamma: float, max_weight: float,
                protected: Sequence[int]) -> Tensor:
    """(K,) NFNet's share per class, in [0, max_weight], non-increasing in DNIS: the seen
    classes' DNIS rescaled to [0, 1] over their range (lowest DNIS -> 1), to the power
    ``gamma``, times ``max_weight`` (< 1 keeps the UDA teacher in every class, so the labels
    cannot collapse onto what the few prompts show). Unseen and protected classes: 0."""
    # no host sync: with nothing seen, lo/hi are +-inf and every weight ends up 0 below
    lo = torch.where(seen, dnis, torch.full_like(dnis, float("inf"))).min()
    hi = torch.where(seen, dnis, torch.full_like(dnis, float("-inf"))).max()
    rel = ((hi - dnis) / (hi - lo).clamp(min=1e-6)).clamp(0, 1)
    w = rel.pow(gamma) * max_weight
    w = torch.where(seen, w, torch.zeros_like(w))
    return torch.where(class_mask(protected, w.numel(), w.device), torch.zeros_like(w), w)


def mix_probabilities(p_uda: Tensor, p_night: Tensor, weights: Tensor) -> Tensor:
    """Class-wise mix of two (B, K, H, W) probability maps, renormalised over classes:
    p_c = (1 - w_c) p_uda_c + w_c p_night_c."""
    w = weights.view(1, -1, 1, 1).to(p_uda)
    mixed = (1 - w) * p_uda + w * p_night
    return mixed / mixed.sum(1, keepdim=True).clamp(min=1e-12)


def prompt_class_masks(prompt_seg: Tensor, weights: Tensor, rate: float, generator: torch.Generator) -> Tensor:
    """(B, H, W) bool: pixels of the prompt crop to paste into the student's mixed image.
    Each class present in a prompt crop is taken with probability ``rate * w_c`` (DMS: more
    prompt content of the classes NFNet is trusted with, i.e. of low DNIS)."""
    b, k = prompt_seg.shape[0], weights.numel()
    draw = to_device_async(torch.rand(b, k, generator=generator), weights.device)
    take = draw < (rate * weights).view(1, k)
    seg = prompt_seg.clamp(0, k)  # 255 -> k (never taken)
    take = torch.cat([take, torch.zeros(b, 1, dtype=torch.bool, device=take.device)], 1)
    return take.gather(1, seg.reshape(b, -1)).view_as(prompt_seg)
