"""Source-only baseline: supervised cross-entropy on the labelled source stream."""
from __future__ import annotations

from typing import Any, Dict, Mapping

import torch

from eglp_dist.methods.base import Method


class SourceOnly(Method):
    streams = ("source",)

    def step(self, batches: Mapping[str, Dict[str, Any]], it: int) -> Dict[str, torch.Tensor]:
        src = batches["source"]
        outputs, losses, logs = self.train_forward(self.student, src["img"], src["seg"])
        self.student.backward(losses["loss"])
        self.student.step()
        self.keep_visual(src_img=src["img"], src_seg=src["seg"], src_pred=outputs["logits"][:1].argmax(1))
        return logs
