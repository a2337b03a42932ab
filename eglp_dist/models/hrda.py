"""HRDA: context-aware high-resolution segmentation (Hoyer et al., ECCV 2022).

The same encoder and head see two views of a training crop:

* **context**: the whole crop downscaled by ``context_scale`` (0.5): long-range layout;
* **detail**: a ``detail_crop`` window (512 of a 1024 crop) at full resolution, at a random
  offset that is a multiple of ``crop_divisible`` (8), drawn per forward.

A scale-attention head (same head type, ``attention_embed_dim`` wide, sigmoid, one map per
class) on the context features decides per pixel how much to trust detail over context:
``fused = a * detail + (1 - a) * context``, with ``a`` zeroed outside the detail box during
training (there is no detail prediction there). Loss (``losses``):
``(1 - hr_w - lr_w) * CE(fused) + hr_w * CE(detail on its box) [+ lr_w * CE(context)]`` with
``hr_w = 0.1``. Inference (``predict``) slides detail windows over the full-resolution image
(stride half a window by default), averages their logits and fuses them with the context
prediction of the whole image; ``infer`` can additionally slide test windows (1024, stride
512) over a whole image, each handled by ``predict``.

Differences from HRDA's code, both deliberate and documented in docs/models.md:

* the attention is upsampled to the detail resolution *before* it is masked and the convex
  combination is formed (HRDA multiplies ``(1 - a) * context`` at context resolution and then
  upsamples); values agree away from box borders, and ours makes ``a = 1`` give exactly the
  detail logits inside the box and ``a = 0`` exactly the upsampled context everywhere;
* the crop offset comes from a caller-seedable ``torch.Generator`` (or an explicit ``box``)
  instead of NumPy's global RNG, so runs are reproducible and resume exactly.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from eglp_dist.models.heads import resize
from eglp_dist.models.segmentor import Segmentor, pixel_accuracy
from eglp_dist.models.sliding import Box, slide


def draw_box(height: int, width: int, crop: Sequence[int], divisible: int,
             generator: Optional[torch.Generator] = None) -> Box:
    """A random (y1, y2, x1, x2) crop of ``crop`` inside (height, width), offsets multiples of
    ``divisible`` drawn uniformly from ``generator`` (HRDA's ``get_crop_bbox``; it never draws
    the last offset, ``(margin + 1) // divisible`` choices, we draw every valid one)."""
    ch, cw = min(crop[0], height), min(crop[1], width)
    device = generator.device if generator is not None else "cpu"

    def offset(margin: int) -> int:
        choices = margin // divisible + 1
        return int(torch.randint(0, choices, (1,), generator=generator, device=device).item()) * divisible

    y1, x1 = offset(height - ch), offset(width - cw)
    return (y1, y1 + ch, x1, x1 + cw)


class HRDASegmentor(Segmentor):
    """Encoder + head + scale attention with HRDA's multi-resolution forward passes."""

    def __init__(self, cfg, encoder: nn.Module, head: nn.Module, attention: Optional[nn.Module]):
        super().__init__(cfg, encoder, head)
        self.scale_attention = attention  # None when hrda.fixed_attention is set
        self.out_stride = int(encoder.reductions[0])

    # -- pieces ------------------------------------------------------------------------
    def context_view(self, images: torch.Tensor) -> torch.Tensor:
        return F.interpolate(images, scale_factor=self.cfg.hrda.context_scale, mode="bilinear",
                             align_corners=False)

    def logit_grid(self, height: int, width: int):
        return (math.ceil(height / self.out_stride), math.ceil(width / self.out_stride))

    def attention(self, context_feats: List[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """Scale attention in [0, 1] on the context logit grid, (B, K or 1, h, w)."""
        fixed = self.cfg.hrda.fixed_attention
        if fixed is not None:
            return like.new_full((like.shape[0], 1, *like.shape[-2:]), float(fixed))
        return torch.sigmoid(self.scale_attention(context_feats))

    @staticmethod
    def fuse(context_logits: torch.Tensor, detail_logits: torch.Tensor, attention: torch.Tensor,
             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``a * detail + (1 - a) * up(context)`` on the detail grid; ``a`` is upsampled, then
        multiplied by ``mask`` (1 inside the detail box)."""
        size = detail_logits.shape[-2:]
        att = resize(attention, size)
        if mask is not None:
            att = att * mask
        return att * detail_logits + (1 - att) * resize(context_logits, size)

    def detail_logits(self, crops: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encoder(crops))

    # -- inference ---------------------------------------------------------------------
    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
        """Features of the context view (HRDA's ``feature_scale = 0.5``), as used for the
        ImageNet feature distance; the same tensors ``forward_train`` returns."""
        return self.encoder(self.context_view(images), generator=generator)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Context of the whole input fused with sliding detail windows; logits at input size.

        This is HRDA's ``encode_decode``: the EMA teacher's pseudo-label forward on a crop.
        """
        h = self.cfg.hrda
        ctx_feats = self.encode(images)
        ctx_logits = self.decode(ctx_feats)
        att = self.attention(ctx_feats, ctx_logits)
        stride = h.detail_stride or [max(c // 2, 1) for c in h.detail_crop]
        det = slide(self.detail_logits, images, h.detail_crop, stride, out_stride=self.out_stride,
                    batched=self.cfg.batched_slide)
        return resize(self.fuse(ctx_logits, det, att), images.shape[-2:])

    # -- training ----------------------------------------------------------------------
    def forward_train(self, images: torch.Tensor, box: Optional[Sequence[int]] = None,
                      generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
        """Context + one detail crop.

        ``box`` = (y1, y2, x1, x2) in input pixels, or None to draw one from ``generator``
        (offsets multiples of ``hrda.crop_divisible``). Returns ``logits`` (fused, stride 4 of
        the input), ``logits_hr`` (detail crop, stride 4), ``logits_lr`` (context),
        ``attention`` (context grid, before masking), ``box`` and ``features`` (context).
        """
        h = self.cfg.hrda
        _, _, height, width = images.shape
        if box is None:
            box = draw_box(height, width, h.detail_crop, h.crop_divisible, generator)
        y1, y2, x1, x2 = (int(v) for v in box)
        if not (0 <= y1 < y2 <= height and 0 <= x1 < x2 <= width):
            raise ValueError(f"HRDA detail box {tuple(box)} is not inside the {height}x{width} input")
        ctx_feats = self.encode(images, generator=generator)
        ctx_logits = self.decode(ctx_feats)
        att = self.attention(ctx_feats, ctx_logits)
        hr_logits = self.detail_logits(images[:, :, y1:y2, x1:x2])

        s = self.out_stride
        grid = self.logit_grid(height, width)
        oy, ox = y1 // s, x1 // s
        hh, hw = min(hr_logits.shape[-2], grid[0] - oy), min(hr_logits.shape[-1], grid[1] - ox)
        inserted = hr_logits.new_zeros((hr_logits.shape[0], hr_logits.shape[1], *grid))
        inserted[:, :, oy:oy + hh, ox:ox + hw] = hr_logits[:, :, :hh, :hw]
        mask = hr_logits.new_zeros((1, 1, *grid))
        mask[:, :, oy:oy + hh, ox:ox + hw] = 1
        fused = self.fuse(ctx_logits, inserted, att, mask)
        return {"logits": fused, "logits_hr": hr_logits, "logits_lr": ctx_logits, "attention": att,
                "box": (y1, y2, x1, x2), "features": ctx_feats}

    def losses(self, outputs: Dict[str, Any], seg: torch.Tensor,
               weight: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """``loss = (1 - hr_w - lr_w) * CE(fused) + hr_w * CE(detail, label on its box)
        [+ lr_w * CE(context)]``; components ``loss_seg``, ``loss_seg_hr`` (and ``loss_seg_lr``)
        are reported already weighted, as HRDA logs them."""
        h = self.cfg.hrda
        out = {"loss_seg": (1.0 - h.hr_loss_weight - h.lr_loss_weight) * self._ce(outputs["logits"], seg, weight)}
        if h.hr_loss_weight > 0:
            y1, y2, x1, x2 = outputs["box"]
            seg_box = seg[..., y1:y2, x1:x2]
            weight_box = weight[..., y1:y2, x1:x2] if weight is not None else None
            out["loss_seg_hr"] = h.hr_loss_weight * self._ce(outputs["logits_hr"], seg_box, weight_box)
        if h.lr_loss_weight > 0:
            out["loss_seg_lr"] = h.lr_loss_weight * self._ce(outputs["logits_lr"], seg, weight)
        out["loss"] = sum(out.values())
        out["acc_seg"] = pixel_accuracy(outputs["logits"], seg, self.ignore_index)
        return out
