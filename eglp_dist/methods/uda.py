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
from dataclasses import dataclass
from typing import Optional

import torch

from eglp_dist.methods.parts.ema import EMATeacher
from eglp_dist.errors import ConfigError
from eglp_dist.methods.base import Method, StepState
from eglp_dist.methods.parts.classmix import class_masks, mix
from eglp_dist.methods.parts.feature_distance import feature_distance_loss
from eglp_dist.methods.parts.mic import block_mask
from eglp_dist.methods.parts.pseudo_iou import build_pseudo_iou
from eglp_dist.methods.parts.pseudo_label import pseudo_labels
from eglp_dist.methods.parts.strong_aug import strong_augment


@dataclass
class UDAStepState(StepState):
    """What UDA's phases hand each other (filled as they run)."""
    plabel: Optional[torch.Tensor] = None  # (B, H, W) long: the label the student learns on the target
    pweight: Optional[torch.Tensor] = None  # (B, H, W) float: its per-pixel weight
    mixed_img: Optional[torch.Tensor] = None
    mixed_seg: Optional[torch.Tensor] = None
    mixed_weight: Optional[torch.Tensor] = None
    mixed_gt: Optional[torch.Tensor] = None  # ground truth under mixed_seg (the diagnostic only)


class UDA(Method):
    streams = ("source", "target")
    state_type = UDAStepState

    def __init__(self, cfg, env, device):
        super().__init__(cfg, env, device)
        if cfg.method.mix.enabled:
            require_paired_streams(cfg.data, "source", "target", "method.mix", "ClassMix pairs source and target images")
        self.teacher = EMATeacher(self.student.model, cfg.method.teacher.alpha)
        self.add_part("teacher", self.teacher)
        self.pseudo_iou = build_pseudo_iou(cfg, self.pseudo_label_sources(cfg), device)
        if self.pseudo_iou is not None:
            self.ground_truth_streams = ("target",)
        self.imnet = None
        if cfg.method.fd.enabled:
            # The pretrained network as built, before any step: rebuilt identically on resume
            # (same seed, same pretrained file), so it is not checkpointed.
            self.imnet = copy.deepcopy(self.student.model).requires_grad_(False).eval()

    # -- the pseudo-label diagnostic (never touches a loss) -----------------------------
    @staticmethod
    def pseudo_label_sources(cfg) -> tuple:
        """The pseudo-label sources this recipe has, from its config (methods/parts/pseudo_iou.py)."""
        return ("teacher", "final")

    def counters(self) -> list:
        return [self.pseudo_iou] if self.pseudo_iou is not None else []

    def observe(self, s: UDAStepState, source: str, label, weight=None, gt=None) -> None:
        """Count one pseudo-label source against the target's ground truth (when the
        diagnostic is on; ``gt`` defaults to the target batch's)."""
        if self.pseudo_iou is None:
            return
        gt = target_ground_truth(s.batches["target"]) if gt is None else gt
        self.pseudo_iou.add(source, label, gt, weight)

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
    def teacher_logits(self, teacher: EMATeacher, engine, images: torch.Tensor) -> torch.Tensor:
        """An EMA teacher's pseudo-label forward (HRDA: context + sliding detail windows)."""
        with engine.autocast():
            return teacher.pseudo_label_mode().predict(images)

    @torch.no_grad()
    def pseudo_label(self, images: torch.Tensor):
        p = self.cfg.method.pseudo
        logits = self.teacher_logits(self.teacher, self.student, images)
        return pseudo_labels(logits, p.threshold, p.ignore_top, p.ignore_bottom, p.ignore_left, p.ignore_right)

    # -- one iteration, as named phases ---------------------------------------------------
    # A subclass overrides the phases it changes (or adds its own) and lists them, so
    # PIG/EGLP never copy this step.
    def phases(self):
        return (self.update_teachers, self.source_step, self.pseudo_label_step, self.mix_step,
                self.augment_step, self.target_step, self.optimizer_step)

    def update_teachers(self, s: UDAStepState) -> None:
        """EMA teachers move towards their students before they label (DAFormer's order)."""
        if s.it > 0:
            self.teacher.update(self.student.model, s.it)

    def source_step(self, s: UDAStepState) -> None:
        """Supervised loss on the source batch (+ ImageNet feature distance); backward."""
        src = s.batches["source"]
        out, losses, logs = self.train_forward(self.student, src["img"], src["seg"], prefix="src")
        loss = losses["loss"]
        if self.imnet is not None:
            fd = self.feature_distance(src["img"], src["seg"], out["features"])
            logs["src.loss_imnet_feat_dist"] = fd.detach()
            loss = loss + fd
        self.student.backward(loss)
        s.logs.update(logs)
        s.visuals.update(src_img=src["img"], src_seg=src["seg"], src_pred=out["logits"][:1].argmax(1))

    def pseudo_label_step(self, s: UDAStepState) -> None:
        """The teacher's labels and confidence weights of the target batch."""
        tgt = s.batches["target"]
        s.plabel, s.pweight, confidence = self.pseudo_label(tgt["img"])
        s.logs["pseudo.confidence"] = confidence.mean()
        self.observe(s, "teacher", s.plabel, s.pweight)

    def mix_step(self, s: UDAStepState) -> None:
        """ClassMix of source classes onto the target (labels and weights by the same mask)."""
        src, tgt = s.batches["source"], s.batches["target"]
        if self.cfg.method.mix.enabled:
            mask = class_masks(src["seg"], self.generator, src.get("label_counts")).to(src["img"].device)
            s.mixed_img = mix(mask, src["img"], tgt["img"])
            s.mixed_seg = mix(mask, src["seg"], s.plabel)
            s.mixed_weight = mix(mask, torch.ones_like(s.pweight), s.pweight)
            if self.pseudo_iou is not None:  # source pixels are not counted (see pseudo_iou.py)
                gt = target_ground_truth(tgt)
                s.mixed_gt = mix(mask, torch.full_like(gt, 255), gt)
        else:
            s.mixed_img, s.mixed_seg, s.mixed_weight = tgt["img"], s.plabel, s.pweight
            if self.pseudo_iou is not None:
                s.mixed_gt = target_ground_truth(tgt)

    def augment_step(self, s: UDAStepState) -> None:
        """Colour jitter and blur of the mixed images (after everything is pasted in)."""
        s.mixed_img = self.augment(s.mixed_img)

    def target_step(self, s: UDAStepState) -> None:
        """Weighted loss on the mixed images (+ MIC's masked target); backward."""
        m = self.cfg.method
        tgt = s.batches["target"]
        self.observe(s, "final", s.mixed_seg, s.mixed_weight, s.mixed_gt)
        out, losses, logs = self.train_forward(self.student, s.mixed_img, s.mixed_seg, s.mixed_weight,
                                               prefix="mix")
        s.logs.update(logs)
        self.student.backward(losses["loss"])
        if m.mic.enabled:
            masked = self.augment(tgt["img"]) if m.mic.color_aug else tgt["img"]
            b, _, h, w = masked.shape
            masked = masked * block_mask(b, h, w, m.mic.block_size, m.mic.ratio, self.generator,
                                         masked.device)
            _, losses_mic, logs_mic = self.train_forward(self.student, masked, s.plabel, s.pweight,
                                                         prefix="masked")
            s.logs.update(logs_mic)
            # MIC scales only the masked image's decode loss (``decode.loss_seg``: HRDA's fused
            # term), not HRDA's detail term (masking_consistency_module.py)
            self.student.backward(losses_mic["loss"] + (m.mic.weight - 1.0) * losses_mic["loss_seg"])
        s.visuals.update(tgt_img=tgt["img"], tgt_pseudo=s.plabel, tgt_seg=tgt.get("seg"),
                         mix_img=s.mixed_img, mix_seg=s.mixed_seg, mix_pred=out["logits"][:1].argmax(1))


def require_paired_streams(data, a: str, b: str, key: str, why: str) -> None:
    """Streams ``a`` and ``b`` whose images a phase pairs one to one: the same batch_size and
    crop_size, or a ConfigError naming ``key`` and both streams."""
    sa, sb = getattr(data, a), getattr(data, b)
    if sa.batch_size != sb.batch_size or list(sa.crop_size or []) != list(sb.crop_size or []):
        raise ConfigError(f"{key}: {why}, so data.{a} and data.{b} need the same batch_size and crop_size "
                          f"(got {sa.batch_size}x{list(sa.crop_size or [])} and "
                          f"{sb.batch_size}x{list(sb.crop_size or [])})")


def target_ground_truth(batch) -> torch.Tensor:
    """The target's labels for the diagnostic: ``gt`` (read for diagnostics only) or
    ``seg`` (a target stream configured with labels)."""
    gt = batch.get("gt", batch.get("seg"))
    if gt is None:
        raise RuntimeError("the pseudo-label diagnostic is on but the target batch has no labels")
    return gt
