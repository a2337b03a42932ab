"""ClassMix (DACS/DAFormer): paste half of the source image's classes onto the target image.

DAFormer (``mmseg/models/utils/dacs_transforms.py``, ``get_class_masks`` /
``generate_class_mask`` / ``one_mix``, called from ``mmseg/models/uda/dacs.py``):

* candidates = ``torch.unique`` of the *source ground truth*, which still holds the ignore
  value 255, so 255 is a candidate like any class: when it is drawn, the source's ignored
  pixels are pasted and the mixed label is 255 there (ignored by the loss). We do the same.
* ``np.random.choice(n, (n + n % 2) / 2, replace=False)``: half of the candidates, rounded up,
  without replacement; mask = 1 on pixels whose label is one of the chosen values. The mask is
  therefore always a union of whole classes.
* ``one_mix``: ``mask * source + (1 - mask) * target`` for the image, the label (source gt vs
  pseudo-label) and the weight (1 for source pixels vs the pseudo-label weight).

Deliberate differences:

1. **Per image candidates.** DAFormer's loop is ``for label in labels: classes =
   torch.unique(labels)`` -- it takes the unique values of the *whole batch* (DACS' original
   code took them per image). Classes of the other images of the batch can then be drawn and
   paste nothing, so how much is pasted depends on the per-rank batch size. We take the
   candidates of each image alone (DACS' rule), which is what ClassMix describes and does not
   change with the number of GPUs.
2. Randomness comes from an explicit ``torch.Generator`` (``torch.randperm``), not numpy's
   global RNG, so a checkpointed generator state resumes the same masks.
3. ``mix`` selects with ``torch.where`` instead of ``m * a + (1 - m) * b``: identical for
   finite values and a 0/1 mask, exact for every dtype (labels stay long).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from eglp_dist.device_constants import to_device_async


def _chosen_classes(seg_b: Tensor, generator: torch.Generator, counts: Optional[Tensor] = None) -> Tensor:
    """The values of ``seg_b`` (one image) picked for pasting, on ``seg_b``'s device.

    ``counts``: the image's (256,) pixel counts per label value as a *host* tensor the loader
    computed beside the batch (``batch["label_counts"]``); then nothing here waits for the
    GPU: the candidates and their number are known on the host and the pick is indexed on
    the device. Without them ``torch.unique`` finds them on the device (one host sync per
    image: its output size)."""
    if counts is None:
        classes = torch.unique(seg_b)                   # sorted candidates, ignore value included
    else:
        classes = torch.nonzero(counts).flatten().to(seg_b.device, non_blocking=True)
    n = int(classes.numel())
    k = (n + n % 2) // 2                                # half, rounded up (DAFormer)
    perm = torch.randperm(n, generator=generator, device=generator.device)[:k]
    return classes[to_device_async(perm, classes.device)]


def class_masks(seg: Tensor, generator: torch.Generator, counts: Optional[Tensor] = None) -> Tensor:
    """ClassMix masks: per image, 1 on the pixels of a random half (rounded up) of its classes.

    Args:
        seg: (B, H, W) long source labels (ignore value 255 counts as a candidate, as in
            DAFormer). (B, 1, H, W) is accepted too.
        generator: the method's generator; ``B`` calls of ``torch.randperm`` are drawn from it,
            in image order.
        counts: optional (B, 256) host pixel counts per label value (the loader's
            ``batch["label_counts"]``): the same masks, without host syncs.

    Returns:
        (B, 1, H, W) float32 mask on ``seg``'s device; 1 = take the source pixel.
    """
    if generator is None:
        raise ValueError("class_masks needs an explicit torch.Generator")
    if seg.dim() == 4 and seg.shape[1] == 1:
        seg = seg[:, 0]
    if seg.dim() != 3:
        raise ValueError(f"seg must be (B, H, W), got shape {tuple(seg.shape)}")
    masks = []
    for b in range(seg.shape[0]):
        chosen = _chosen_classes(seg[b], generator, None if counts is None else counts[b])
        masks.append(torch.isin(seg[b], chosen))
    return torch.stack(masks).unsqueeze(1).to(torch.float32)


def mix(mask: Tensor, fg: Tensor, bg: Tensor) -> Tensor:
    """``fg`` where ``mask == 1``, ``bg`` elsewhere (DAFormer ``one_mix``).

    Works for images (B, C, H, W) and for labels / weights (B, H, W); the result has ``fg``'s
    dtype (``fg`` and ``bg`` must share it), so long labels stay long.

    Args:
        mask: (B, 1, H, W) 0/1 mask from :func:`class_masks` (any dtype).
        fg: values taken where the mask is 1 (the source).
        bg: values taken where the mask is 0 (the target).
    """
    if fg.shape != bg.shape:
        raise ValueError(f"fg and bg must have the same shape, got {tuple(fg.shape)} and {tuple(bg.shape)}")
    if fg.dtype != bg.dtype:
        raise ValueError(f"fg and bg must have the same dtype, got {fg.dtype} and {bg.dtype}")
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, 1, H, W), got shape {tuple(mask.shape)}")
    m = mask.to(device=fg.device) != 0
    if fg.dim() == 3:
        m = m[:, 0]
    elif fg.dim() != 4:
        raise ValueError(f"fg must be (B, C, H, W) or (B, H, W), got shape {tuple(fg.shape)}")
    return torch.where(m, fg, bg)
