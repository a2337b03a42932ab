"""Source-only baseline: supervised cross-entropy on the labelled source stream.

Three phases: ``augment_source_step`` (nothing here: DAFormer/HRDA's source pipeline is
geometric only, done by the data engine), ``source_step`` (the supervised loss; backward)
and ``optimizer_step``. SPN's domain-generalisation recipe overrides the first
(``methods/spn.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from eglp_dist.methods.base import Method, StepState


@dataclass
class SourceStepState(StepState):
    img: Optional[torch.Tensor] = None  # the source images the student trains on (augmented)


class SourceOnly(Method):
    streams = ("source",)
    state_type = SourceStepState

    def phases(self):
        return (self.augment_source_step, self.source_step, self.optimizer_step)

    def augment_source_step(self, s: SourceStepState) -> None:
        """Photometric augmentation of the source batch on the device (none here)."""
        s.img = s.batches["source"]["img"]

    def source_step(self, s: SourceStepState) -> None:
        seg = s.batches["source"]["seg"]
        outputs, losses, logs = self.train_forward(self.student, s.img, seg)
        self.student.backward(losses["loss"])
        s.logs.update(logs)
        s.visuals.update(src_img=s.img, src_seg=seg, src_pred=outputs["logits"][:1].argmax(1))
