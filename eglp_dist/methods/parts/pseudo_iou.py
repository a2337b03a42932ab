"""Pseudo-label quality against ground truth: a diagnostic, never part of a loss.

EGLP's claim is "high-quality pseudo-labels". Where the target's training samples carry
labels (every synthetic target; ACDC's train split), each pseudo-label *source* of a recipe
is compared with the ground truth under the same crop and flip:

* ``teacher``: the UDA (EMA) teacher's argmax, weighted by its confidence weight;
* ``nfnet``: the NFNet teacher's argmax (its label carries no weight of its own: weight 1);
* ``dms``: EGLP's DMS label (argmax of the two teachers' class-wise mix), its weight;
* ``fused``: the label after the recipe's fusion (PIG's top-k, EGLP's DMS + FIS), the UDA
  family's weight;
* ``final``: the label the student is trained on, on the mixed image, after ClassMix and the
  prompt and rare-class pastes, with the pixel weights of the loss. Its ground truth is the
  target's on target pixels and the pasted classes' on pasted pixels; ClassMix's *source*
  pixels are not counted (their label is the source ground truth, the same in every recipe).

Per source, two (K, K) confusion matrices (ground truth x label): pixels counted once, and
pixels counted by their loss weight. They are accumulated on the device by ``index_add_``
(no host sync, no collective in the step) and reduced by SUM in the log interval's one
collective (``logging.Monitor.flush``), then logged as ``pseudo_iou/<source>/mIoU``,
``pseudo_iou/<source>/<class>`` and ``pseudo_iou_weighted/<source>/...``.

Switched by ``method.diagnostics.pseudo_label_iou``: ``null`` (the default: on when the
target's shards hold labels), ``true`` (an error if they do not), ``false`` (costs nothing). The labels come from
the loader as ``batch["gt"]``, cropped and flipped with the image but never looked at when
drawing the crop, so a run with the diagnostic trains exactly as one without it (tested).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from eglp_dist.data.labels import CLASSES
from eglp_dist.errors import ConfigError
from eglp_dist.metrics import metrics_from_confusion

SOURCES = ("teacher", "nfnet", "dms", "fused", "final")


class PseudoLabelIoU:
    """Confusion matrices of each pseudo-label source, a ``logging.Counter``."""

    name = "pseudo_label_iou"

    def __init__(self, sources: Sequence[str], num_classes: int, device="cpu"):
        unknown = [s for s in sources if s not in SOURCES]
        if unknown:
            raise ValueError(f"unknown pseudo-label sources {unknown} (known: {SOURCES})")
        self.sources = tuple(sources)
        self.k = num_classes
        # [source, (unweighted, weighted), K*K + 1]: the last bin takes ignored pixels
        self.counts = torch.zeros(len(self.sources), 2, num_classes * num_classes + 1,
                                  dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, source: str, label: Tensor, gt: Tensor, weight: Optional[Tensor] = None) -> None:
        """Count (B, H, W) ``label`` against ``gt`` (255 or any value >= K: not counted);
        ``weight`` (B, H, W) per-pixel loss weights (None: 1)."""
        i = self.sources.index(source)
        k = self.k
        gt = gt.long()
        label = label.long()
        valid = (gt >= 0) & (gt < k) & (label >= 0) & (label < k)
        idx = torch.where(valid, gt * k + label, torch.full_like(gt, k * k)).reshape(-1)
        ones = torch.ones(idx.numel(), dtype=torch.float64, device=idx.device)
        self.counts[i, 0].index_add_(0, idx, ones)
        w = ones if weight is None else weight.reshape(-1).to(torch.float64)
        self.counts[i, 1].index_add_(0, idx, w)

    def take(self) -> Tensor:
        out = self.counts[..., :-1].clone()
        self.counts.zero_()
        return out

    def summarise(self, reduced: Tensor) -> Dict[str, float]:
        out: Dict[str, float] = {}
        k = self.k
        for i, source in enumerate(self.sources):
            for j, prefix in enumerate(("pseudo_iou", "pseudo_iou_weighted")):
                # the evaluation's rule (metrics.py): a class in neither labels nor predictions
                # has no IoU and does not enter the mean
                m = metrics_from_confusion(reduced[i, j].view(k, k))
                for c in range(k):
                    out[f"{prefix}/{source}/{CLASSES[c] if c < len(CLASSES) else c}"] = float(m.iou[c])
                out[f"{prefix}/{source}/mIoU"] = m.miou
        return out


def target_is_labelled(cfg) -> bool:
    """Whether every shard folder of ``data.target`` holds labels (its manifest says so)."""
    from eglp_dist.data.config import shard_folders
    from eglp_dist.data.shards import Manifest

    folders = shard_folders(cfg.data.target.shards, "data.target.shards")
    return bool(folders) and all(Manifest.load(f).labelled for f in folders)


def build_pseudo_iou(cfg, sources: Sequence[str], device) -> Optional[PseudoLabelIoU]:
    """The diagnostic for a recipe's ``sources``, or None when it is off."""
    mode = cfg.method.diagnostics.pseudo_label_iou
    if mode is False:
        return None
    labelled = target_is_labelled(cfg) if cfg.data.target.shards else False
    if mode is True and not labelled:
        raise ConfigError(f"method.diagnostics.pseudo_label_iou=true: the target's shards "
                          f"({cfg.data.target.shards or 'none set'}) hold no labels to compare with; "
                          f"set it to null (auto) or false")
    return PseudoLabelIoU(sources, cfg.model.num_classes, device) if labelled else None
