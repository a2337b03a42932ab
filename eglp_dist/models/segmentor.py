"""The segmentor: encoder + decode head behind the interface the training loop uses.

One ``nn.Module`` answers every question a recipe asks of a network:

* ``forward(images)`` / ``infer``: logits at input size (whole-image sliding windows if
  configured). ``forward(images, mode="train")`` is the training forward; going through
  ``forward`` matters because DDP and DeepSpeed only wrap ``forward``.
* ``predict(images)``: one window, logits at input size; the EMA teacher's pseudo-label path.
* ``encode(images)``: encoder features (feature distance to ImageNet, class statistics).
* ``forward_train`` -> outputs dict; ``losses(outputs, seg, weight)`` -> loss dict.
* ``param_groups``: DAFormer's optimiser groups.

``HRDASegmentor`` (``hrda.py``) overrides the multi-resolution parts; SPN is an encoder
(``spn.py``) and needs nothing here.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from eglp_dist.models.backbones import Encoder
from eglp_dist.models.heads import resize
from eglp_dist.models.sliding import slide

# Substrings of encoder parameter names that take no weight decay: DAFormer's optimiser
# ``custom_keys`` (``norm`` and ``pos_block``, decay_mult 0), matched by name as mmcv does.
NO_DECAY_KEYS = ("norm", "pos_block")


def seg_cross_entropy(logits: torch.Tensor, seg: torch.Tensor, weight: Optional[torch.Tensor] = None,
                      ignore_index: int = 255, avg_non_ignore: bool = False) -> torch.Tensor:
    """Pixel-wise CE of ``logits`` (resized to the label's size) with optional per-pixel weights.

    ``avg_non_ignore=False`` averages over all pixels, ignored ones counting as 0: mmseg 0.x's
    reduction, which DAFormer/HRDA and their pseudo-label weights were tuned with.
    """
    if seg.dim() == 4:
        seg = seg[:, 0]
    logits = resize(logits.float(), seg.shape[-2:])
    loss = F.cross_entropy(logits, seg.long(), ignore_index=ignore_index, reduction="none")
    if weight is not None:
        if weight.dim() == 4:
            weight = weight[:, 0]
        loss = loss * weight.float()
    if avg_non_ignore:
        return loss.sum() / (seg != ignore_index).sum().clamp(min=1)
    return loss.mean()


def pixel_accuracy(logits: torch.Tensor, seg: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Percentage of non-ignored pixels predicted right (mmseg's ``acc_seg``), for logging."""
    if seg.dim() == 4:
        seg = seg[:, 0]
    with torch.no_grad():
        pred = resize(logits.float(), seg.shape[-2:]).argmax(1)
        valid = seg != ignore_index
        # counts, not boolean indexing: a mask index needs the count on the host (a GPU sync)
        correct = ((pred == seg) & valid).sum().float()
        return correct / valid.sum().clamp_min(1).float() * 100


class Segmentor(nn.Module):
    """Encoder + decode head (DAFormer or DeepLabV3+), built by ``build_segmentor``."""

    def __init__(self, cfg, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.head = head
        self.num_classes = cfg.num_classes
        self.ignore_index = cfg.ignore_index

    # -- inference ---------------------------------------------------------------------
    def forward(self, images: torch.Tensor, mode: str = "infer", **kwargs: Any):
        """``mode``: ``infer`` (default; logits at input size), ``train`` (``forward_train``),
        ``predict`` (one window) or ``encode``. Follows the module's train/eval mode."""
        if mode == "infer":
            return self.infer(images)
        if mode == "train":
            return self.forward_train(images, **kwargs)
        if mode == "predict":
            return self.predict(images)
        if mode == "encode":
            return self.encode(images, **kwargs)
        raise ValueError(f"unknown forward mode {mode!r}")

    def infer(self, images: torch.Tensor) -> torch.Tensor:
        """Logits at input size; slides ``test_window`` over the image when configured."""
        if self.cfg.test_window is None:
            return self.predict(images)
        return slide(self.predict, images, self.cfg.test_window, self.cfg.test_stride,
                     batched=self.cfg.batched_slide)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits at input size from one pass over ``images`` (the pseudo-label forward)."""
        return resize(self.decode(self.encode(images)), images.shape[-2:])

    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
        """Encoder feature levels (stride 4 first)."""
        return self.encoder(images, generator=generator)

    def decode(self, feats: List[torch.Tensor]) -> torch.Tensor:
        """Stride-4 logits from feature levels."""
        return self.head(feats)

    # -- training ----------------------------------------------------------------------
    def forward_train(self, images: torch.Tensor, box: Optional[Sequence[int]] = None,
                      generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
        """``{"logits": stride-4 logits, "features": encoder levels}``.

        ``generator`` seeds stochastic parts (SPN prompts). ``box`` is HRDA's detail crop,
        accepted and unused here so that one call works for every model.
        """
        feats = self.encode(images, generator=generator)
        return {"logits": self.decode(feats), "features": feats}

    def losses(self, outputs: Dict[str, Any], seg: torch.Tensor,
               weight: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """``{"loss": total to backpropagate, "loss_seg": CE, "acc_seg": % (no grad)}``.

        ``seg``: (B, H, W) train ids with ``ignore_index``; ``weight``: optional (B, H, W)
        per-pixel weights (pseudo-label confidence).
        """
        ce = self._ce(outputs["logits"], seg, weight)
        return {"loss": ce, "loss_seg": ce, "acc_seg": pixel_accuracy(outputs["logits"], seg, self.ignore_index)}

    def _ce(self, logits, seg, weight):
        return seg_cross_entropy(logits, seg, weight, self.ignore_index, self.cfg.loss_avg_non_ignore)

    # -- optimiser ---------------------------------------------------------------------
    def param_groups(self, lr: float, weight_decay: float, head_lr_mult: float = 10.0,
                     no_decay_keys: Sequence[str] = NO_DECAY_KEYS) -> List[Dict[str, Any]]:
        """DAFormer's optimiser groups.

        Parameters of the pretrained encoder (timm ``Encoder`` modules) train at ``lr``;
        everything else (decode head, HRDA scale attention, SPN scale fusion) is new and trains
        at ``lr * head_lr_mult``. Encoder parameters whose name contains ``norm`` or
        ``pos_block`` take no weight decay. As in DAFormer (mmcv ``custom_keys``, where the
        ``head`` key matches first), every head parameter keeps weight decay. Each group
        carries ``lr_mult``/``decay_mult`` so a schedule can rescale it.
        """
        pretrained = set()
        for module in self.modules():
            if isinstance(module, Encoder):
                pretrained.update(id(p) for p in module.parameters())
        groups: Dict[str, Dict[str, Any]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            is_encoder = id(p) in pretrained
            no_decay = is_encoder and any(k in name for k in no_decay_keys)
            key = ("encoder" if is_encoder else "head") + ("_no_decay" if no_decay else "")
            if key not in groups:
                lr_mult = 1.0 if is_encoder else head_lr_mult
                decay_mult = 0.0 if no_decay else 1.0
                groups[key] = {"name": key, "params": [], "lr": lr * lr_mult, "lr_mult": lr_mult,
                               "weight_decay": weight_decay * decay_mult, "decay_mult": decay_mult}
            groups[key]["params"].append(p)
        order = ["encoder", "encoder_no_decay", "head", "head_no_decay"]
        return [groups[k] for k in order if k in groups]
