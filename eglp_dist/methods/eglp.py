"""EGLP: PIG's night branch plus DNIS, FIS / DMS and the Rare Class Memory.

On top of :class:`~eglp_dist.methods.pig.PIG` (which is UDA plus NFNet); the phases it
changes or adds, every other one inherited:

    update_teachers -> source_step -> pseudo_label_step -> mix_step -> prompt_paste_step
      -> rcm_paste_step -> augment_step -> target_step -> night_step (dark mix + RCM) -> optimizer_step

* ``pseudo_label_step``: both teachers' class probabilities on the target crop; this step's
  DNIS sums (source by GT; prompt by GT and confident target pixels) and RCM's confidence
  sums are packed into **one** flat tensor and all-reduced (SUM) once, before fusion. Then:
  DMS (``method.eglp.dms``) mixes the two teachers' probabilities class by class with
  weights falling with DNIS -> label and confidence weight; or, DMS off, FIS
  (``method.eglp.fis``) gives the low-DNIS classes NFNet's label; or, DNIS off, PIG's
  similarity top-k. Confidence uses RCM's class-wise thresholds (label level).
* ``prompt_paste_step`` (DMS): prompt pixels of classes NFNet is trusted with (low DNIS),
  each class with probability ``prompt_rate * w_c``, pasted into the mixed image (weight 1).
* ``rcm_paste_step`` and the dark mix: rare-class patches from the memory (weight 1).

Every switch is one override (``method.eglp.{dnis,fis,dms,rcm}.enabled``,
``method.nfnet.enabled``), so each ablation is one line. docs/eglp.md says where each
choice comes from.
"""
from __future__ import annotations

import torch

from eglp_dist.dist import comm
from eglp_dist.eglp.dnis import DNIS, WIDTH, confident_labels
from eglp_dist.eglp.fusion import (dms_weights, fis_classes, fuse_labels, mix_probabilities,
                                   prompt_class_masks)
from eglp_dist.eglp.rcm import RareClassMemory
from eglp_dist.errors import ConfigError
from eglp_dist.eglp.similarity import moments
from eglp_dist.methods.pig import PIG
from eglp_dist.methods.pseudo_label import labels_from_probs
from eglp_dist.methods.uda import StepState


class EGLP(PIG):
    phases = ("update_teachers", "source_step", "pseudo_label_step", "mix_step", "prompt_paste_step",
              "rcm_paste_step", "augment_step", "target_step", "night_step", "optimizer_step")

    def __init__(self, cfg, env, device):
        e = cfg.method.eglp
        super().__init__(cfg, env, device)
        k = cfg.model.num_classes
        self.dnis = DNIS(k, self.mean, self.std, e.dnis.momentum, e.dnis.temperature,
                         e.dnis.min_confidence, device) if e.dnis.enabled else None
        if self.dnis is not None:
            self.modules["dnis"] = self.dnis  # reduced: identical on every rank
        self.rcm = None
        if e.rcm.enabled:
            crop = min(cfg.data.target.crop_size or [e.rcm.patch])
            if e.rcm.patch > crop:
                raise ConfigError(f"method.eglp.rcm.patch: {e.rcm.patch} px patches do not fit "
                                  f"{crop} px crops")
            self.rcm = RareClassMemory(e.rcm.classes, e.rcm.capacity, e.rcm.patch, e.rcm.min_pixels, k, device)
        if self.dnis is None and self.similarity is None and cfg.method.nfnet.enabled and \
                (e.fis.enabled or e.dms.enabled):
            raise ConfigError("method.eglp.dnis.enabled=false: FIS/DMS need DNIS; use PIG's fusion "
                              "(method.fusion.enabled=true) or switch fis/dms off")

    # -- statistics of the step: one collective ---------------------------------------------------
    def reduce_statistics(self, s: StepState, p_uda: torch.Tensor) -> None:
        """DNIS and RCM sums of this rank's step -> one all_reduce(SUM) -> folded in."""
        src, tgt, prompt = s.batches["source"], s.batches["target"], s.batches["prompt"]
        k = self.cfg.model.num_classes
        prob_max, label = p_uda.max(1)
        parts = []
        if self.dnis is not None:
            night = [(prompt["img"], prompt["seg"]),
                     (tgt["img"], confident_labels(label, prob_max, self.dnis.min_confidence))]
            parts.append(self.dnis.step_sums(src["img"], src["seg"], night).reshape(-1))
        if self.rcm is not None:
            parts.append(self.rcm.confidence_sums(prob_max, label).reshape(-1))
        if not parts:
            return
        flat = comm.all_reduce_sum(torch.cat([p.double() for p in parts]))  # the one collective
        if self.dnis is not None:
            n = 2 * k * WIDTH
            self.dnis.fold(flat[:n])
            flat = flat[n:]
        if self.rcm is not None:
            self.rcm.update_confidence(flat.view(2, k), self.cfg.method.eglp.rcm.momentum)

    def thresholds(self):
        p = self.cfg.method.pseudo
        if self.rcm is not None and self.cfg.method.eglp.rcm.class_thresholds:
            return self.rcm.thresholds(p.threshold)
        return p.threshold

    # -- phases ----------------------------------------------------------------------------------
    def pseudo_label_step(self, s: StepState) -> None:
        e, p = self.cfg.method.eglp, self.cfg.method.pseudo
        tgt = s.batches["target"]
        p_uda = torch.softmax(self.teacher_logits(self.teacher, self.student, tgt["img"]).float(), 1)
        self.reduce_statistics(s, p_uda)
        margins = (p.ignore_top, p.ignore_bottom, p.ignore_left, p.ignore_right)
        uda_label, uda_weight, confidence = labels_from_probs(p_uda, self.thresholds(), *margins)
        s.plabel, s.pweight = uda_label, uda_weight
        s.logs["pseudo.confidence"] = confidence.mean()
        zero = torch.zeros((), device=p_uda.device)
        s.logs["fusion.replaced"] = zero
        s.logs["dms.mean_weight"] = zero
        if self.dnis is not None:
            dnis = self.dnis.value()
            s.logs.update(self.dnis.logs(dnis))
        if self.nfnet is None:
            return
        if self.dnis is None:  # PIG's fusion by image similarity (the ablation without DNIS+DMS)
            if self.similarity is not None:
                self.fuse_by_similarity(s)
            return
        seen = self.dnis.seen()
        if e.dms.enabled:
            w = dms_weights(dnis, seen, e.dms.gamma, e.dms.max_weight, list(e.fis.protected))
            p_night = torch.softmax(self.teacher_logits(self.nfnet_teacher, self.nfnet, tgt["img"]).float(), 1)
            mixed = mix_probabilities(p_uda, p_night, w)
            s.plabel, s.pweight, confidence = labels_from_probs(mixed, self.thresholds(), *margins)
            s.logs["pseudo.confidence"] = confidence.mean()
            s.logs["dms.mean_weight"] = w.mean()
            s.extra["dms_weights"] = w
        elif e.fis.enabled:
            night = self.night_label(tgt["img"])
            chosen = fis_classes(dnis, seen, e.fis.mode, e.fis.k, e.fis.threshold, list(e.fis.protected))
            s.plabel = fuse_labels(uda_label, night, chosen.expand(uda_label.shape[0], -1),
                                   list(e.fis.protected))
        s.logs["fusion.replaced"] = (s.plabel != uda_label).float().mean()

    def prompt_paste_step(self, s: StepState) -> None:
        """DMS: prompt pixels of low-DNIS classes into the student's mixed image (weight 1)."""
        w = s.extra.get("dms_weights")
        if w is None or self.cfg.method.eglp.dms.prompt_rate <= 0:
            return
        prompt = s.batches["prompt"]
        mask = prompt_class_masks(prompt["seg"], w, self.cfg.method.eglp.dms.prompt_rate, self.generator)
        s.mixed_img = torch.where(mask.unsqueeze(1), prompt["img"], s.mixed_img)
        s.mixed_seg = torch.where(mask, prompt["seg"], s.mixed_seg)
        s.mixed_weight = torch.where(mask, torch.ones_like(s.mixed_weight), s.mixed_weight)
        s.logs["dms.prompt_pixels"] = mask.float().mean()

    def rcm_paste_step(self, s: StepState) -> None:
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
            self.generator, self.night_shift(), self.mean, self.std)
        s.logs["rcm.pasted_pixels"] = pasted.float().mean()
        s.logs["rcm.bank_fill"] = self.rcm.filled.float().mean() / self.rcm.capacity

    def decorate_dark_mix(self, s: StepState, img, seg):
        if self.rcm is None:
            return img, seg
        img, seg, _, _ = self.rcm.paste(img, seg, None, self.cfg.method.eglp.rcm.paste_per_image,
                                        self.generator, self.night_shift(), self.mean, self.std)
        return img, seg

    def night_shift(self):
        """(K, 3) night-minus-day mean log intensity per class from DNIS's sums (classes seen on
        both sides; the others get the mean shift of the seen ones), or None (no adjustment)."""
        if self.dnis is None or not self.cfg.method.eglp.rcm.night_adjust:
            return None
        _, day, _ = moments(self.dnis.sums[0])
        _, night, _ = moments(self.dnis.sums[1])
        shift = (night - day)[:, :3].float()
        seen = self.dnis.seen().unsqueeze(1)
        avg = (shift * seen).sum(0) / seen.sum().clamp(min=1)
        return torch.where(seen, shift, avg.expand_as(shift))

    # -- per-rank state: the memory bank -----------------------------------------------------------
    def state_dict(self):
        state = super().state_dict()
        if self.rcm is not None:
            state["rcm"] = self.rcm.state_dict()
        return state

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        if self.rcm is not None:
            self.rcm.load_state_dict(state["rcm"])

