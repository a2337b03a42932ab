"""DAFormer's ImageNet feature distance (thing-class FD) on the source image.

DAFormer (``mmseg/models/uda/dacs.py``: ``calc_feat_dist`` / ``masked_feat_dist``, and
``mmseg/utils/utils.py``: ``downscale_label_ratio``) regularises the student's last encoder
level towards a frozen ImageNet copy on the source image:

* ``scale_factor = gt.shape[-1] // feat[-1].shape[-1]`` (label width over feature width);
* the label is downscaled by that factor with a majority rule: one-hot with the ignore value
  255 replaced by an extra class ``n_classes`` (so ignored pixels compete as their own class),
  ``avg_pool2d(kernel=scale)`` (floor: trailing rows/columns that do not fill a cell are
  dropped), ``max`` over classes (first index on ties); the cell gets the majority value, 255
  if that majority is the ignore class, and 255 if the majority share is ``< min_ratio`` (0.75);
* FD mask = downscaled label in ``imnet_feature_dist_classes`` (Cityscapes "things" 6, 7,
  11-18); classes ``None`` means no mask (every feature pixel);
* loss = mean over masked feature pixels (pooled over the batch) of the per-pixel L2 norm over
  channels of ``feat - feat_imnet``; the ImageNet features are computed without grad. The
  weight ``imnet_feature_dist_lambda`` (0.005) is applied by the caller.

Deliberate differences:

1. No masked pixel: DAFormer's ``torch.mean`` of an empty selection is NaN (logged as NaN;
   its gradient is zero). We return an exact 0 that is still a function of ``feat``
   (``sum(where(mask, dist, 0)) / max(count, 1)``). A loss that is a plain constant has no
   ``grad_fn``: ``backward`` on it fails, or -- if the caller skips it -- this rank would run a
   different backward from the ranks that did have thing pixels, and DDP / ZeRO, which reduce
   gradients bucket by bucket during backward, would hang or reduce mismatched buckets. A
   zero connected to ``feat`` keeps every rank's backward identical and contributes zero
   gradients. The formula has no data-dependent branch (no ``if mask.any()``), so every rank
   runs the same operations whatever its labels.
2. ``downscale_label_ratio`` counts labels with a scatter-add into (cell, class) bins instead
   of a (B, K+1, H, W) float one-hot (same counts, same float32 ratio ``count / scale**2``
   compared with ``min_ratio``, same tie rule), which saves ~K times the label's memory at
   1024x1024, and with no host sync on a GPU (``bincount`` would read the max).
3. ``scale == 1`` is allowed (the label is kept, cells of one pixel); DAFormer asserts > 1.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from eglp_dist.device_constants import constant


def _as_bhw(seg: Tensor) -> Tensor:
    if seg.dim() == 4 and seg.shape[1] == 1:
        seg = seg[:, 0]
    if seg.dim() != 3:
        raise ValueError(f"seg must be (B, H, W), got shape {tuple(seg.shape)}")
    return seg


@torch.no_grad()
def downscale_label_ratio(seg: Tensor, scale: int, min_ratio: float, num_classes: int,
                          ignore_index: int = 255) -> Tensor:
    """Majority-vote downscaling of a label map by an integer factor (DAFormer's rule).

    Args:
        seg: (B, H, W) long labels in ``[0, num_classes)`` or ``ignore_index``
            ((B, 1, H, W) accepted).
        scale: cell size; the output is (B, H // scale, W // scale), trailing pixels dropped.
        min_ratio: a cell keeps its majority value only if that value covers at least this
            share of the cell's ``scale * scale`` pixels.
        num_classes: K; ignored pixels are counted as an extra class K.
        ignore_index: the ignore value, in the input and the output.

    Returns:
        (B, H // scale, W // scale) long: majority class, or ``ignore_index`` when the
        majority is the ignore class or its share is below ``min_ratio``.
    """
    seg = _as_bhw(seg)
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    b, h, w = seg.shape
    oh, ow = h // scale, w // scale
    k1 = num_classes + 1
    lab = seg[:, :oh * scale, :ow * scale].long()
    lab = torch.where(lab == ignore_index, torch.full_like(lab, num_classes), lab)
    check_labels(lab, num_classes, f"labels must lie in [0, {num_classes}) or be {ignore_index}")
    # flat bin per (image, output cell, class)
    cell = ((torch.arange(oh * scale, device=lab.device) // scale)[:, None] * ow
            + (torch.arange(ow * scale, device=lab.device) // scale)[None, :])          # (h', w')
    img = torch.arange(b, device=lab.device)[:, None, None] * (oh * ow)
    flat = ((img + cell[None]) * k1 + lab).flatten()
    # scatter-add, not bincount: CUDA's bincount reads the input's max on the host (a sync)
    counts = torch.zeros(b * oh * ow * k1, dtype=torch.long, device=lab.device)
    counts = counts.index_add_(0, flat, torch.ones_like(flat)).view(b, oh, ow, k1)
    ratio = counts.to(torch.float32) / float(scale * scale)                            # avg_pool2d
    best_ratio, best = ratio.max(dim=-1)                                                # first on ties
    out = torch.where(best == num_classes, torch.full_like(best, ignore_index), best)
    return torch.where(best_ratio < min_ratio, torch.full_like(out, ignore_index), out)


def check_labels(lab: Tensor, num_classes: int, message: str) -> None:
    """Labels in [0, num_classes] (K = the ignore class here), without a host sync on a GPU:
    a ValueError on CPU, a device-side assert on CUDA (raised at the next sync, with the
    message)."""
    bad = (lab < 0) | (lab > num_classes)
    if lab.device.type == "cpu":
        if bool(bad.any()):
            raise ValueError(message)
    else:
        torch._assert_async(~bad.any(), message)


def feature_distance_loss(feat: Tensor, feat_ref: Tensor, seg: Tensor,
                          classes: Optional[Sequence[int]] = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18),
                          min_ratio: float = 0.75, num_classes: int = 19,
                          ignore_index: int = 255) -> Tensor:
    """Mean L2 distance between student and ImageNet features on thing-class feature pixels.

    Args:
        feat: (B, C, h, w) student features (last encoder level), with grad.
        feat_ref: (B, C, h, w) frozen ImageNet-model features (detached here).
        seg: (B, H, W) source labels; the FD mask is :func:`downscale_label_ratio` of ``seg``
            by ``W // w`` (DAFormer: label width over feature width), which must give (h, w).
        classes: classes whose (majority-downscaled) feature pixels count; ``None``: all pixels.
        min_ratio, num_classes, ignore_index: as :func:`downscale_label_ratio`.

    Returns:
        Scalar (float32 or feat's wider dtype): mean over masked pixels of
        ``||feat - feat_ref||_2`` over channels; an exact 0 connected to ``feat`` when no pixel
        is masked (see module docstring).
    """
    if feat.shape != feat_ref.shape or feat.dim() != 4:
        raise ValueError(f"feat and feat_ref must be equal (B, C, h, w), got {tuple(feat.shape)} "
                         f"and {tuple(feat_ref.shape)}")
    wd = torch.promote_types(feat.dtype, torch.float32)
    dist = torch.linalg.vector_norm(feat.to(wd) - feat_ref.detach().to(wd), ord=2, dim=1)  # (B, h, w)
    if classes is None:
        return dist.mean()
    seg = _as_bhw(seg)
    scale = seg.shape[-1] // feat.shape[-1]
    lbl = downscale_label_ratio(seg, scale, min_ratio, num_classes, ignore_index)
    if lbl.shape != dist.shape:
        raise ValueError(f"label {tuple(seg.shape)} downscaled by {scale} gives {tuple(lbl.shape)}, "
                         f"features are {tuple(dist.shape)}")
    cls = constant(list(classes), lbl.device, lbl.dtype)
    mask = torch.isin(lbl, cls)
    total = torch.where(mask, dist, torch.zeros_like(dist)).sum()
    return total / mask.sum().clamp_min(1).to(dist.dtype)
