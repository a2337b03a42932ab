"""Pseudo-labels and their confidence weight from the EMA teacher's logits (DAFormer/DACS).

DAFormer (``mmseg/models/uda/dacs.py``, ``forward_train``) turns the teacher's target logits
into a hard label and a *single scalar* confidence weight:

    softmax over classes -> (max prob, argmax)
    weight = (number of pixels whose max prob >= pseudo_threshold) / (number of pixels)
    weight[:, :psweight_ignore_top] = 0;  weight[:, -psweight_ignore_bottom:] = 0

The share is taken over every pixel of the image, the rows that are then zeroed included.

**Deliberate difference: one weight per image, not per batch.** DAFormer pools the share over
the whole batch it sees (two images on its one GPU). Pooled over the per-rank batch, the
weight would change with the per-rank batch size, i.e. with the number of GPUs the same global
batch is split over, and two ranks would weight the same image differently. Per image, the
weight of an image depends on that image (and the teacher) alone. With equal-sized images the
batch mean of our per-image confidences equals DAFormer's pooled share.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
from torch import Tensor


@torch.no_grad()
def pseudo_labels(logits: Tensor, threshold: float = 0.968, ignore_top: int = 0,
                  ignore_bottom: int = 0, ignore_left: int = 0, ignore_right: int = 0
                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """Hard pseudo-labels, per-pixel weights and per-image confidence.

    Args:
        logits: (B, K, H, W) teacher logits (any float dtype; softmax is taken in float32 so
            that a half-precision teacher gives the same confidence as a float32 one).
        threshold: a pixel is confident when its max softmax probability is ``>=`` this
            (DAFormer ``pseudo_prob.ge(pseudo_threshold)``).
        ignore_top, ignore_bottom: number of rows at the top / bottom whose weight is set to 0
            (DAFormer ``pseudo_weight_ignore_top/bottom``: rectification artefacts at the top,
            the ego car at the bottom of Cityscapes-like crops). They still count in the share.
        ignore_left, ignore_right: the same for columns (PIG's margins are [30, 240, 30, 30]
            for top, bottom, left, right on every target).

    Returns:
        label: (B, H, W) long, argmax over K.
        weight: (B, H, W) float32, ``confidence[b]`` on every pixel of image b, 0 on ignored rows.
        confidence: (B,) float32, share of image b's pixels with max prob >= threshold.
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, K, H, W), got shape {tuple(logits.shape)}")
    prob = torch.softmax(logits.detach().float(), dim=1)
    return labels_from_probs(prob, threshold, ignore_top, ignore_bottom, ignore_left, ignore_right)


@torch.no_grad()
def labels_from_probs(prob: Tensor, threshold: Union[float, Tensor] = 0.968, ignore_top: int = 0,
                      ignore_bottom: int = 0, ignore_left: int = 0, ignore_right: int = 0
                      ) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`pseudo_labels` from class probabilities (B, K, H, W); ``threshold`` may be one
    number or one per class (K,): a pixel is confident when its max probability reaches the
    threshold of its predicted class (EGLP's rare-class thresholds)."""
    if min(ignore_top, ignore_bottom, ignore_left, ignore_right) < 0:
        raise ValueError(f"margins must be >= 0, got top/bottom/left/right "
                         f"{ignore_top}/{ignore_bottom}/{ignore_left}/{ignore_right}")
    max_prob, label = prob.max(dim=1)                                   # (B, H, W)
    thr = threshold[label] if torch.is_tensor(threshold) else threshold
    confident = max_prob.ge(thr)
    b, h, w = label.shape
    # exact integer count, divided in float64 (DAFormer: python int / int), stored as float32
    confidence = (confident.flatten(1).sum(dim=1).double() / float(h * w)).float()  # (B,)
    weight = confidence.view(b, 1, 1).expand(b, h, w).contiguous()
    weight.mul_(margin_mask(h, w, ignore_top, ignore_bottom, ignore_left, ignore_right, weight.device))
    return label, weight, confidence


def margin_mask(h: int, w: int, top: int = 0, bottom: int = 0, left: int = 0, right: int = 0,
                device="cpu") -> Tensor:
    """(H, W) float32: 0 on the ignored margins (rows at the top/bottom, columns at the
    left/right), 1 elsewhere."""
    mask = torch.ones(h, w, device=device)
    if top > 0:
        mask[:top, :] = 0
    if bottom > 0:
        mask[max(h - bottom, 0):, :] = 0
    if left > 0:
        mask[:, :left] = 0
    if right > 0:
        mask[:, max(w - right, 0):] = 0
    return mask
