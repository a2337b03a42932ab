"""Segmentation metrics from a confusion matrix.

The confusion matrix is a sum of counts, so it is reduced across ranks with one all_reduce
(SUM) and N ranks give exactly the matrix one rank would over the same images. IoU follows
mmseg/cityscapesScripts: pixels labelled 255 are ignored, and a class that appears neither in
the labels nor in the predictions has no IoU (NaN) and is left out of the mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from eglp_dist.data.labels import CLASS_SETS, CLASSES, IGNORE_INDEX, NUM_CLASSES
from eglp_dist.runtime import comm


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """[num_classes, num_classes] int64 counts, rows = label, columns = prediction."""
    pred = pred.reshape(-1).long()
    label = label.reshape(-1).long()
    keep = (label != IGNORE_INDEX) & (label >= 0) & (label < num_classes)
    idx = label[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


class ConfusionMeter:
    """Accumulates on the device the predictions live on; `reduce()` sums across ranks."""

    def __init__(self, num_classes: int = NUM_CLASSES, device: Optional[torch.device] = None):
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        self.matrix += confusion_matrix(pred.to(self.matrix.device), label.to(self.matrix.device),
                                        self.num_classes)

    def reduce(self) -> torch.Tensor:
        return comm.all_reduce_sum(self.matrix.clone()).cpu()


@dataclass
class SegMetrics:
    iou: np.ndarray  # per class, NaN where the class is absent from labels and predictions
    acc: np.ndarray  # per-class pixel accuracy (recall), NaN where absent from labels
    overall_acc: float

    @property
    def miou(self) -> float:
        return float(np.nanmean(self.iou)) if np.isfinite(self.iou).any() else float("nan")

    def miou_over(self, classes: Sequence[int]) -> float:
        sub = self.iou[list(classes)]
        return float(np.nanmean(sub)) if np.isfinite(sub).any() else float("nan")

    def miou_of_set(self, name: str) -> float:
        """mIoU over a named class set (labels.CLASS_SETS); ``all`` = every class."""
        return self.miou if name == "all" else self.miou_over(CLASS_SETS[name])

    def as_dict(self, class_names: Sequence[str] = CLASSES,
                class_sets: Sequence[str] = ("all",)) -> Dict[str, object]:
        """``mIoU`` over the first of ``class_sets`` (the headline), ``mIoU_<set>`` for each."""
        return {
            "mIoU": self.miou_of_set(class_sets[0]), "aAcc": self.overall_acc,
            **{f"mIoU_{name}": self.miou_of_set(name) for name in class_sets},
            "IoU": {n: (None if np.isnan(v) else float(v)) for n, v in zip(class_names, self.iou)},
        }


def metrics_from_confusion(matrix: torch.Tensor | np.ndarray) -> SegMetrics:
    m = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(m)
    gt = m.sum(1)
    pred = m.sum(0)
    union = gt + pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
        overall = float(tp.sum() / m.sum()) if m.sum() > 0 else float("nan")
    return SegMetrics(iou=iou, acc=acc, overall_acc=overall)


def format_table(metrics: SegMetrics, class_names: Sequence[str] = CLASSES,
                 class_sets: Sequence[str] = ("all",)) -> str:
    """The per-class table printed by eval/score (percent, mmseg style), with the mIoU of
    each class set (labels.CLASS_SETS)."""
    lines: List[str] = [f"{'class':<15}{'IoU':>8}{'Acc':>8}", "-" * 31]
    for name, iou, acc in zip(class_names, metrics.iou, metrics.acc):
        fmt = lambda v: "     n/a" if np.isnan(v) else f"{100 * v:8.2f}"  # noqa: E731
        lines.append(f"{name:<15}{fmt(iou)}{fmt(acc)}")
    lines.append("-" * 31)
    for name in class_sets:
        label = "mIoU" if name == "all" else f"mIoU {name}"
        lines.append(f"{label:<15}{100 * metrics.miou_of_set(name):8.2f}")
    lines.append(f"{'aAcc':<15}{100 * metrics.overall_acc:8.2f}")
    return "\n".join(lines)
