"""DAFormer/HRDA unsupervised domain adaptation (DACS self-training with an EMA teacher).

One iteration, in DAFormer's order (``mmseg/models/uda/dacs.py``):

1. the EMA teacher moves towards the student: ``alpha_t = min(1 - 1/(t+1), alpha)`` for
   t >= 1 (at t = 0 it *is* the student);
2. source: supervised CE (HRDA: fused + detail losses) plus the ImageNet feature distance
   on "thing" classes against a frozen copy of the initial (pretrained) network; backward;
3. target: the teacher's prediction of the whole target crop (HRDA: context fused with
   sliding detail windows) gives pseudo-labels and one confidence weight per image;
4. ClassMix: half of each source image's classes pasted onto its target image, labels and
   weights mixed by the same mask (source pixels weight 1); colour jitter and blur on the
   mixed image; weighted CE; backward;
5. optional MIC: the (jittered) target with 70% of its 64-pixel blocks blanked must match
   the pseudo-labels; backward;
6. one optimiser step.

The model does the multi-resolution work (``model.hrda``): with an HRDA model, steps 2, 4
and 5 are HRDA's context + detail training forward and step 3 HRDA's pseudo-label forward.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Mapping

import torch

from eglp_dist.dist.ema import EMATeacher
from eglp_dist.errors import ConfigError
from eglp_dist.methods.base import Method
from eglp_dist.methods.classmix import class_masks, mix
from eglp_dist.methods.feature_distance import feature_distance_loss
from eglp_dist.methods.mic import block_mask
from eglp_dist.methods.pseudo_label import pseudo_labels
from eglp_dist.methods.strong_aug import strong_augment


class UDA(Method):
    streams = ("source", "target")

    def __init__(self, cfg, env, device):
        super().__init__(cfg, env, device)
        src, tgt = cfg.data.source, cfg.data.target
        if cfg.method.mix.enabled and (src.batch_size != tgt.batch_size or
                                       list(src.crop_size or []) != list(tgt.crop_size or [])):
            raise ConfigError("method.mix: ClassMix pairs source and target images, so "
                              "data.source and data.target need the same batch_size and crop_size "
                              f"(got {src.batch_size}x{list(src.crop_size or [])} and "
                              f"{tgt.batch_size}x{list(tgt.crop_size or [])})")
        self.teacher = EMATeacher(self.student.model, cfg.method.teacher.alpha)
        self.modules["teacher"] = self.teacher
        self.imnet = None
        if cfg.method.fd.enabled:
            # The pretrained network as built, before any step: rebuilt identically on resume
            # (same seed, same pretrained file), so it is not checkpointed.
            self.imnet = copy.deepcopy(self.student.model).requires_grad_(False).eval()

    # -- pieces --------------------------------------------------------------------------
    def augment(self, images: torch.Tensor) -> torch.Tensor:
        m = self.cfg.method.mix
        return strong_augment(images, self.mean, self.std, self.generator, jitter_p=m.jitter_p,
                              jitter_strength=m.jitter_strength, blur_p=m.blur_p,
                              blur_sigma=tuple(m.blur_sigma))

    def feature_distance(self, images: torch.Tensor, seg: torch.Tensor, feats) -> torch.Tensor:
        fd = self.cfg.method.fd
        with torch.no_grad(), self.student.autocast():
            ref = self.imnet.encode(images)
        classes = list(fd.classes) if fd.classes is not None else None
        dist = feature_distance_loss(feats[-1].float(), ref[-1].float(), seg, classes, fd.min_ratio,
                                     self.cfg.model.num_classes)
        return fd.weight * dist

    @torch.no_grad()
    def pseudo_label(self, images: torch.Tensor):
        p = self.cfg.method.pseudo
        with self.student.autocast():
            logits = self.teacher.pseudo_label_mode().predict(images)
        return pseudo_labels(logits, p.threshold, p.ignore_top, p.ignore_bottom)

    # -- one iteration -------------------------------------------------------------------
    def step(self, batches: Mapping[str, Dict[str, Any]], it: int) -> Dict[str, torch.Tensor]:
        m = self.cfg.method
        src, tgt = batches["source"], batches["target"]
        if it > 0:
            self.teacher.update(self.student.model, it)

        out_src, losses, logs = self.train_forward(self.student, src["img"], src["seg"], prefix="src")
        loss = losses["loss"]
        if self.imnet is not None:
            fd = self.feature_distance(src["img"], src["seg"], out_src["features"])
            logs["src.loss_imnet_feat_dist"] = fd.detach()
            loss = loss + fd
        self.student.backward(loss)

        plabel, pweight, confidence = self.pseudo_label(tgt["img"])
        logs["pseudo.confidence"] = confidence.mean()
        if m.mix.enabled:
            mask = class_masks(src["seg"], self.generator).to(src["img"].device)
            mixed_img = mix(mask, src["img"], tgt["img"])
            mixed_seg = mix(mask, src["seg"], plabel)
            mixed_weight = mix(mask, torch.ones_like(pweight), pweight)
        else:
            mixed_img, mixed_seg, mixed_weight = tgt["img"], plabel, pweight
        mixed_img = self.augment(mixed_img)
        out_mix, losses_mix, logs_mix = self.train_forward(self.student, mixed_img, mixed_seg, mixed_weight,
                                                           prefix="mix")
        logs.update(logs_mix)
        self.student.backward(losses_mix["loss"])

        if m.mic.enabled:
            masked = self.augment(tgt["img"]) if m.mic.color_aug else tgt["img"]
            b, _, h, w = masked.shape
            masked = masked * block_mask(b, h, w, m.mic.block_size, m.mic.ratio, self.generator,
                                         masked.device)
            _, losses_mic, logs_mic = self.train_forward(self.student, masked, plabel, pweight, prefix="masked")
            logs.update(logs_mic)
            self.student.backward(m.mic.weight * losses_mic["loss"])

        self.student.step()
        self.keep_visual(src_img=src["img"], src_seg=src["seg"], src_pred=out_src["logits"][:1].argmax(1),
                         tgt_img=tgt["img"], tgt_pseudo=plabel, tgt_seg=tgt.get("seg"),
                         mix_img=mixed_img, mix_seg=mixed_seg, mix_pred=out_mix["logits"][:1].argmax(1))
        return logs
