"""EGLP: PIG's night branch plus DNIS, DMS and FIS, and the Rare Class Memory.

On top of :class:`~eglp_dist.methods.pig.PIG` (which is UDA plus NFNet); the phases it
changes or adds, every other one inherited:

    update_teachers -> source_step -> pseudo_label_step -> mix_step -> prompt_paste_step
      -> rcm_paste_step -> augment_step -> target_step -> night_step (dark mix + RCM) -> optimizer_step

* ``pseudo_label_step``: both teachers' class probabilities on the target crop; this step's
  DNIS sums (source by GT; prompt by GT and confident target pixels) and RCM's confidence
  sums go into **one** all-reduce (SUM, ``runtime.parts``), started after the UDA teacher's
  forward and waited for after NFNet's, before fusion. Then,
  as the EGLP README reads them, stages of one pipeline: **DMS** (``method.eglp.dms``) mixes
  the two teachers' probabilities class by class with weights falling with DNIS -> label and
  confidence weight; **FIS** (``method.eglp.fis``) then gives the lowest-DNIS classes NFNet's
  label outright (a confident UDA prediction cannot be outvoted by DMS's mix alone); DNIS off,
  PIG's similarity top-k instead. Last, RCM's label level: confident rare-class pixels weigh 1.
* ``prompt_paste_step`` (DMS, with or without NFNet: its weights come from DNIS): prompt
  pixels of classes NFNet is trusted with (low DNIS), each class with probability
  ``prompt_rate * w_c``, pasted into the mixed image (weight 1).
* ``rcm_paste_step`` and the dark mix: rare-class patches from the memory (weight 1; the dark
  mix, NFNet's input, gets night patches only unless ``rcm.day_patches_to_nfnet``).

Every switch is one override (``method.eglp.{dnis,fis,dms,rcm}.enabled``,
``method.nfnet.enabled``, ``method.eglp.dms.prompt_rate=0``), so each ablation is one line.
docs/eglp.md says where each choice comes from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from eglp_dist.methods.parts.dnis import DNIS, confident_labels
from eglp_dist.methods.parts.fusion import (dms_weights, fis_classes, fuse_labels, mix_probabilities,
                                            prompt_class_masks)
from eglp_dist.methods.parts.rcm import ClassConfidence, RareClassMemory, rare_pixel_weights
from eglp_dist.device_constants import class_mask
from eglp_dist.errors import ConfigError
from eglp_dist.notices import notice
from eglp_dist.methods.parts.similarity import moments
from eglp_dist.methods.pig import PIG
from eglp_dist.methods.parts.pseudo_label import labels_from_probs, margin_mask
from eglp_dist.methods.uda import UDAStepState, require_paired_streams
from eglp_dist.runtime.parts import PendingStatistics, start_reduction


@dataclass
class EGLPStepState(UDAStepState):
    """UDA's hand-overs plus EGLP's: both come from the step's reduced DNIS sums."""
    dms_weights: Optional[torch.Tensor] = None  # (K,) DMS's per-class weight of NFNet's label
    night_shift: Optional[torch.Tensor] = None  # (K, 3) for RCM's day patches (None: no adjustment)


class EGLP(PIG):
    state_type = EGLPStepState

    def __init__(self, cfg, env, device):
        e = cfg.method.eglp
        check_eglp_parts(cfg)
        super().__init__(cfg, env, device)
        k = cfg.model.num_classes
        self.dnis = DNIS(k, self.mean, self.std, e.dnis.momentum, e.dnis.temperature,
                         e.dnis.min_confidence, device) if e.dnis.enabled else None
        if self.dnis is not None:
            self.add_part("dnis", self.dnis)
        self.rcm = self.rcm_conf = None
        if e.rcm.enabled:
            crop = min(cfg.data.target.crop_size or [e.rcm.patch])
            if e.rcm.patch > crop:
                raise ConfigError(f"method.eglp.rcm.patch: {e.rcm.patch} px patches do not fit "
                                  f"{crop} px crops")
            self.rcm = self.add_part("rcm", RareClassMemory(e.rcm.classes, e.rcm.capacity, e.rcm.patch,
                                                            e.rcm.min_pixels, k, device))
            self.rcm_conf = self.add_part("rcm_confidence", ClassConfidence(e.rcm.classes, k, e.rcm.momentum, device))
            self.rare = class_mask(list(e.rcm.classes), k, device)
        if e.dms.enabled and not cfg.method.nfnet.enabled:
            notice("method.nfnet.enabled=false: DMS keeps only its prompt paste (there is no second "
                   "teacher to mix with)")

    @staticmethod
    def pseudo_label_sources(cfg) -> tuple:
        e, n = cfg.method.eglp, cfg.method.nfnet.enabled
        dms = n and e.dms.enabled and e.dnis.enabled
        return ("teacher",) + (("nfnet",) if n else ()) + (("dms",) if dms else ()) + ("fused", "final")

    # -- statistics of the step: one collective ---------------------------------------------------
    def start_statistics(self, s: EGLPStepState, p_uda: torch.Tensor) -> PendingStatistics:
        """This rank's DNIS and RCM sums of the step into the step's one all-reduce (SUM),
        started now and finished where DMS needs them (after NFNet's forward, which they do
        not depend on: the wait for the other ranks hides behind it)."""
        src, tgt, prompt = s.batches["source"], s.batches["target"], s.batches["prompt"]
        prob_max, label = p_uda.max(1)
        parts = []
        if self.dnis is not None:
            night = [(prompt["img"], prompt["seg"]),
                     (tgt["img"], confident_labels(label, prob_max, self.dnis.min_confidence))]
            parts.append((self.dnis, self.dnis.local_sums(src["img"], src["seg"], night)))
        if self.rcm_conf is not None:
            parts.append((self.rcm_conf, self.rcm_conf.local_sums(prob_max, label)))
        return start_reduction(parts)

    # -- phases ----------------------------------------------------------------------------------
    def phases(self):
        return (self.update_teachers, self.source_step, self.pseudo_label_step, self.mix_step,
                self.prompt_paste_step, self.rcm_paste_step, self.augment_step, self.target_step,
                self.night_step, self.optimizer_step)

    def pseudo_label_step(self, s: EGLPStepState) -> None:
        e, p = self.cfg.method.eglp, self.cfg.method.pseudo
        tgt = s.batches["target"]
        p_uda = torch.softmax(self.teacher_logits(self.teacher, self.student, tgt["img"]).float(), 1)
        statistics = self.start_statistics(s, p_uda)
        p_night = None
        if self.nfnet is not None:
            p_night = torch.softmax(self.teacher_logits(self.nfnet_teacher, self.nfnet, tgt["img"]).float(), 1)
        margins = (p.ignore_top, p.ignore_bottom, p.ignore_left, p.ignore_right)
        uda_label, uda_weight, confidence = labels_from_probs(p_uda, p.threshold, *margins)
        self.observe(s, "teacher", uda_label, uda_weight)
        s.plabel, s.pweight = uda_label, uda_weight
        zero = torch.zeros((), device=p_uda.device)
        s.logs.update({"fusion.replaced": zero, "dms.mean_weight": zero})
        statistics.finish()
        s.night_shift = self.night_shift()
        dnis = seen = None
        if self.dnis is not None:
            dnis, seen = self.dnis.value(), self.dnis.seen()
            s.logs.update(self.dnis.logs(dnis))
        if e.dms.enabled and dnis is not None:  # also without NFNet: the prompt paste uses them
            w = dms_weights(dnis, seen, e.dms.gamma, e.dms.max_weight, list(e.fis.protected))
            s.dms_weights = w
            s.logs["dms.mean_weight"] = w.mean()
        probs = p_uda
        if p_night is not None:
            night = p_night.argmax(1)
            if dnis is None:  # PIG's fusion by image similarity (the ablation without DNIS)
                if self.similarity is not None:
                    self.fuse_by_similarity(s, night)
            else:
                if s.dms_weights is not None:
                    probs = mix_probabilities(p_uda, p_night, s.dms_weights)
                    s.plabel, s.pweight, confidence = labels_from_probs(probs, p.threshold, *margins)
                    self.observe(s, "dms", s.plabel, s.pweight)
                if e.fis.enabled:
                    chosen = fis_classes(dnis, seen, e.fis.mode, e.fis.k, e.fis.threshold, list(e.fis.protected))
                    s.plabel = fuse_labels(s.plabel, night, chosen.expand(uda_label.shape[0], -1),
                                           list(e.fis.protected))
            self.observe(s, "nfnet", night)
            s.logs["fusion.replaced"] = (s.plabel != uda_label).float().mean()
        s.logs["pseudo.confidence"] = confidence.mean()
        if self.rcm_conf is not None and e.rcm.class_thresholds:
            h, w_ = s.plabel.shape[-2:]
            s.pweight, boosted = rare_pixel_weights(
                s.pweight, s.plabel, probs.gather(1, s.plabel.unsqueeze(1)).squeeze(1),
                self.rcm_conf.thresholds(p.threshold), self.rare, margin_mask(h, w_, *margins, device=s.pweight.device))
            s.logs["rcm.boosted_pixels"] = boosted.float().mean()
        s.logs["pseudo.mean_weight"] = s.pweight.mean()
        self.observe(s, "fused", s.plabel, s.pweight)

    def prompt_paste_step(self, s: EGLPStepState) -> None:
        """DMS: prompt pixels of low-DNIS classes into the student's mixed image (weight 1)."""
        w = s.dms_weights
        if w is None or self.cfg.method.eglp.dms.prompt_rate <= 0:
            return
        prompt = s.batches["prompt"]
        mask = prompt_class_masks(prompt["seg"], w, self.cfg.method.eglp.dms.prompt_rate, self.generator)
        s.mixed_img = torch.where(mask.unsqueeze(1), prompt["img"], s.mixed_img)
        s.mixed_seg = torch.where(mask, prompt["seg"], s.mixed_seg)
        s.mixed_weight = torch.where(mask, torch.ones_like(s.mixed_weight), s.mixed_weight)
        if s.mixed_gt is not None:
            s.mixed_gt = torch.where(mask, prompt["seg"], s.mixed_gt)
        s.logs["dms.prompt_pixels"] = mask.float().mean()

    def rcm_paste_step(self, s: EGLPStepState) -> None:
        """RCM: store this step's rare-class patches (source by day, prompt by night), then
        paste some into the student's mixed images (image and label level, weight 1)."""
        if self.rcm is None:
            return
        src, prompt = s.batches["source"], s.batches["prompt"]
        self.rcm.add(src["img"], src["seg"], night=False, generator=self.generator, counts=src.get("label_counts"))
        self.rcm.add(prompt["img"], prompt["seg"], night=True, generator=self.generator,
                     counts=prompt.get("label_counts"))
        s.mixed_img, s.mixed_seg, s.mixed_weight, pasted = self.rcm.paste(
            s.mixed_img, s.mixed_seg, s.mixed_weight, self.cfg.method.eglp.rcm.paste_per_image,
            self.generator, s.night_shift, self.mean, self.std)
        if s.mixed_gt is not None:
            s.mixed_gt = torch.where(pasted, s.mixed_seg, s.mixed_gt)
        s.logs["rcm.pasted_pixels"] = pasted.float().mean()
        s.logs["rcm.bank_fill"] = self.rcm.filled.float().mean() / self.rcm.capacity

    def decorate_dark_mix(self, s: EGLPStepState, img, seg):
        """Rare-class patches into NFNet's dark mix: night (prompt) patches only, unless
        ``rcm.day_patches_to_nfnet`` (then day patches moved towards night as for the student)."""
        if self.rcm is None:
            return img, seg
        day_too = self.cfg.method.eglp.rcm.day_patches_to_nfnet
        img, seg, _, _ = self.rcm.paste(img, seg, None, self.cfg.method.eglp.rcm.paste_per_image,
                                        self.generator, s.night_shift if day_too else None,
                                        self.mean, self.std, night_only=not day_too)
        return img, seg

    def night_shift(self) -> Optional[torch.Tensor]:
        """(K, 3) night-minus-day mean log intensity per class from DNIS's sums (classes seen on
        both sides; the others get the mean shift of the seen ones), or None (no adjustment).
        Once per step, after the step's sums are in (both pastes use it)."""
        if self.rcm is None or self.dnis is None or not self.cfg.method.eglp.rcm.night_adjust:
            return None
        _, day, _ = moments(self.dnis.sums[0])
        _, night, _ = moments(self.dnis.sums[1])
        shift = (night - day)[:, :3].float()
        seen = self.dnis.seen().unsqueeze(1)
        avg = (shift * seen).sum(0) / seen.sum().clamp(min=1)
        return torch.where(seen, shift, avg.expand_as(shift))

def check_eglp_parts(cfg) -> None:
    """One rule for EGLP's parts, whichever are on: what each needs, named by its keys."""
    e, n = cfg.method.eglp, cfg.method.nfnet
    if not e.dnis.enabled:
        on = [k for k, part in (("fis", e.fis), ("dms", e.dms)) if part.enabled]
        if on:
            raise ConfigError(f"method.eglp.dnis.enabled=false: {' and '.join(f'method.eglp.{k}.enabled=true' for k in on)} "
                              f"need DNIS; switch {'them' if len(on) > 1 else 'it'} off (PIG's fusion: "
                              f"method.fusion.enabled=true)")
    if e.fis.enabled and not n.enabled:
        raise ConfigError("method.eglp.fis.enabled=true: FIS gives classes NFNet's label, but "
                          "method.nfnet.enabled=false; switch one of them")
    if e.dms.enabled and e.dms.prompt_rate > 0:
        require_paired_streams(cfg.data, "prompt", "target", "method.eglp.dms.prompt_rate",
                               "the prompt paste puts prompt pixels into the target's mixed images")
