"""DNIS: class-wise Day-Night Image Similarity, one number in [0, 1] per class (EGLP).

EGLP names the function and its use (classes with low DNIS are predicted by NFNet, DMS
weights follow it) but publishes no formula; this is ours, built to the house rules:

* **What is compared**: per class c, the appearance of c by day (source pixels whose ground
  truth is c) and by night (prompt pixels whose ground truth is c, and target pixels whose
  pseudo-label is c with confidence >= ``min_confidence``). Appearance = the four pixel
  features of :func:`~eglp_dist.methods.parts.similarity.pixel_features` (log-intensity R, G, B and
  their Sobel gradient magnitude).
* **Kept as sums**: per side and class, [count, sum, sum of squares] of each feature, in
  float64. One step's sums of both sides (``local_sums``) go into the step's one all-reduce
  (SUM, with RCM's: ``runtime.parts``) and come back through ``absorb``, so N ranks see
  exactly the sums one rank would over the union of their samples.
* **Smoothed over steps** by an exponential moving average *of the sums* (momentum m):
  ``S <- m * S + local sums``. A class with no pixels in a step is only scaled by m, which
  leaves its mean and standard deviation, hence its DNIS, exactly as they were: "keeps its
  last value" falls out of the arithmetic. A class never seen on a side is marked unseen and
  has DNIS 1 (no evidence of a change: the UDA teacher keeps it).
* **Similarity**: distance d_c = sum over features of |mean_day - mean_night| +
  |std_day - std_night| (the ``stats`` distance), DNIS_c = exp(-d_c / temperature).

Checkpointed (``state_dict``), identical on every rank (every rank adds the same reduced
sums), logged per class as ``dnis/<class name>``.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from eglp_dist.data.labels import CLASSES
from eglp_dist.methods.parts.similarity import (NUM_FEATURES, binned_sums, class_bins, flat_pixels,
                                                pixel_features, stats_distance)

WIDTH = 1 + 2 * NUM_FEATURES  # count, sums, sums of squares


class DNIS:
    run_wide = True  # every rank absorbs the same reduced sums (runtime.parts)

    def __init__(self, num_classes: int, mean, std, momentum: float = 0.99, temperature: float = 0.5,
                 min_confidence: float = 0.968, device="cpu"):
        self.k, self.mean, self.std = num_classes, list(mean), list(std)
        self.momentum, self.temperature, self.min_confidence = momentum, temperature, min_confidence
        # [side (0 day, 1 night), class, WIDTH] running sums, float64 so counts stay exact
        self.sums = torch.zeros(2, num_classes, WIDTH, dtype=torch.float64, device=device)

    # -- statistics of one step --------------------------------------------------------
    def local_sums(self, day_img: Tensor, day_seg: Tensor, night: list) -> Tensor:
        """(2, K, WIDTH) sums of this rank's step: source pixels by ground truth, and each
        (images, labels) pair of ``night`` (prompt GT; confident target pseudo-labels), every
        image set's pixels in one scatter (day bins 0..K-1, night K..2K-1). Reduced across
        ranks with the step's other statistics (``runtime.parts``)."""
        sets = [(day_img, day_seg, 0)] + [(img, seg, self.k) for img, seg in night]
        features = torch.cat([flat_pixels(pixel_features(img, self.mean, self.std)) for img, _, _ in sets])
        bins = torch.cat([class_bins(seg, self.k, offset, dropped=2 * self.k) for _, seg, offset in sets])
        return binned_sums(features, bins, 2 * self.k + 1)[:2 * self.k].view(2, self.k, WIDTH)

    def absorb(self, reduced: Tensor) -> None:
        """Running sums <- momentum * running sums + this step's sums over all ranks."""
        self.sums.mul_(self.momentum).add_(reduced.view_as(self.sums).to(self.sums))

    # -- derived ---------------------------------------------------------------------------
    def seen(self) -> Tensor:
        """(K,) bool: classes with pixels on both sides so far."""
        return (self.sums[..., 0] > 0).all(0)

    def value(self) -> Tensor:
        """(K,) float32 in [0, 1]: exp(-distance / temperature); 1 for unseen classes."""
        sim = torch.exp(-stats_distance(self.sums[0], self.sums[1]) / self.temperature)
        return torch.where(self.seen(), sim, torch.ones_like(sim)).float()

    def logs(self, value: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """``dnis/<class>`` for every class on every rank (same keys whatever the data)."""
        v = self.value() if value is None else value
        out = {f"dnis/{CLASSES[c] if c < len(CLASSES) else c}": v[c] for c in range(self.k)}
        out["dnis/seen_share"] = self.seen().float().mean()  # of the K classes: averaged over steps
        return out

    # -- checkpoint (Stateful) ---------------------------------------------------------------
    def state_dict(self) -> Dict[str, Tensor]:
        return {"sums": self.sums.clone()}

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        self.sums.copy_(state["sums"])


def confident_labels(label: Tensor, prob_max: Tensor, threshold: float) -> Tensor:
    """Pseudo-labels with unconfident pixels set to 255 (not counted by DNIS)."""
    return torch.where(prob_max >= threshold, label, torch.full_like(label, 255))
