"""Source-only baseline: supervised cross-entropy on the labelled source stream.

One step is two phases: :meth:`SourceOnly.augment_source` (none here: DAFormer/HRDA's source
pipeline is geometric only, done by the data engine) and the supervised update. SPN's
domain-generalisation recipe overrides the first (``methods/spn.py``).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

import torch

from eglp_dist.methods.base import Method


class SourceOnly(Method):
    streams = ("source",)

    def augment_source(self, img: torch.Tensor) -> torch.Tensor:
        """Photometric augmentation of the source batch on the device (identity here)."""
        return img

    def step(self, batches: Mapping[str, Dict[str, Any]], it: int) -> Dict[str, torch.Tensor]:
        src = batches["source"]
        img = self.augment_source(src["img"])
        outputs, losses, logs = self.train_forward(self.student, img, src["seg"])
        self.student.backward(losses["loss"])
        self.student.step()
        self.keep_visual(src_img=img, src_seg=src["seg"], src_pred=outputs["logits"][:1].argmax(1))
        return logs
