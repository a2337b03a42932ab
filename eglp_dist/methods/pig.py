"""PIG-style night UDA ("Prompt Images Guidance for Night-Time Scene Parsing"): the HRDA UDA
recipe plus a Night-Focused Network and pseudo-label fusion by class similarity.

On top of :class:`~eglp_dist.methods.uda.UDA` (whose phases it reuses unchanged):

* ``nfnet``: a second engine (same model config as the student unless ``method.nfnet.model``
  overrides it; its own optimiser/schedule/engine nodes) with its own EMA teacher on the
  same alpha schedule; it never sees a source image;
* ``update_teachers``: both EMA teachers move before labelling;
* ``pseudo_label_step``: the UDA teacher's label, then (``method.fusion``) the ``top_k``
  least similar classes of each image take the NFNet teacher's argmax label, except where the
  UDA teacher predicts a protected class; the weight stays the UDA teacher's. The fused label
  feeds the student's ClassMix (UDA's ``mix_step``/``target_step``) and NFNet's dark mix;
* ``night_step`` (new, before the optimiser step): NFNet's supervised loss on the prompt
  crop and its loss on the dark mix (PMS on even, AMS on odd iterations), unweighted.

Evaluation and export use the UDA student only (``Method.eval_model``). docs/eglp.md says
where each choice comes from.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from eglp_dist.methods.parts.ema import EMATeacher
from eglp_dist.methods.parts.fusion import fuse_labels, top_k_classes
from eglp_dist.methods.parts.nfnet import dark_mix, uses_ams
from eglp_dist.methods.parts.similarity import build_similarity
from eglp_dist.errors import ConfigError
from eglp_dist.methods.parts.mic import block_mask
from eglp_dist.methods.uda import UDA, UDAStepState, require_paired_streams
from eglp_dist.models import build_segmentor


def derived_node(base, overrides, key: str):
    """A config node of the student (``optim``, ``model``, ...) with a second network's
    overrides merged on top, checked like any config (unknown keys named by ``key``)."""
    from eglp_dist.config_merge import merge_checked

    if not overrides:
        return base
    return merge_checked(base, OmegaConf.create(OmegaConf.to_container(overrides)), key)


class PIG(UDA):
    streams = ("source", "target", "prompt")

    def __init__(self, cfg, env, device):
        super().__init__(cfg, env, device)
        n, f = cfg.method.nfnet, cfg.method.fusion
        if n.enabled and n.dark_mix:
            require_paired_streams(cfg.data, "prompt", "target", "method.nfnet.dark_mix",
                                   "pastes prompt crops onto target crops")
        if f.enabled and not n.enabled:
            raise ConfigError("method.fusion.enabled: fusion takes labels from NFNet's teacher; "
                              "set method.nfnet.enabled=true or method.fusion.enabled=false")
        self.nfnet = self.nfnet_teacher = None
        if n.enabled:
            model_cfg = derived_node(cfg.model, n.model, "method.nfnet.model")
            self.nfnet = self.add_engine("nfnet", build_segmentor(model_cfg),
                                         derived_node(cfg.optim, n.optim, "method.nfnet.optim"),
                                         derived_node(cfg.schedule, n.schedule, "method.nfnet.schedule"),
                                         derived_node(cfg.engine, n.engine, "method.nfnet.engine"))
            self.nfnet_teacher = EMATeacher(self.nfnet.model, cfg.method.teacher.alpha)
            self.add_part("nfnet_teacher", self.nfnet_teacher)
        self.similarity = build_similarity(f, self.mean, self.std, cfg.model.num_classes, device) \
            if f.enabled else None

    @staticmethod
    def pseudo_label_sources(cfg) -> tuple:
        fused = cfg.method.nfnet.enabled and cfg.method.fusion.enabled
        return ("teacher",) + (("nfnet", "fused") if fused else ()) + ("final",)

    # -- phases that differ from UDA -------------------------------------------------------
    def phases(self):
        return (self.update_teachers, self.source_step, self.pseudo_label_step, self.mix_step,
                self.augment_step, self.target_step, self.night_step, self.optimizer_step)

    def update_teachers(self, s: UDAStepState) -> None:
        super().update_teachers(s)
        if self.nfnet is not None and s.it > 0:
            self.nfnet_teacher.update(self.nfnet.model, s.it)

    def pseudo_label_step(self, s: UDAStepState) -> None:
        super().pseudo_label_step(s)
        if self.similarity is not None:
            night = self.night_label(s.batches["target"]["img"])
            self.fuse_by_similarity(s, night)
            self.observe(s, "nfnet", night)
            self.observe(s, "fused", s.plabel, s.pweight)

    def fuse_by_similarity(self, s: UDAStepState, night) -> None:
        """PIG's fusion of ``s.plabel`` (the UDA teacher's label) with the NFNet teacher's
        (``night``): the ``top_k`` least similar classes of each image, protected classes
        excepted."""
        src, tgt = s.batches["source"], s.batches["target"]
        f = self.cfg.method.fusion
        scores = self.similarity(src["img"], src["seg"], tgt["img"], s.plabel)
        selected = top_k_classes(scores, f.top_k)
        fused = fuse_labels(s.plabel, night, selected, list(f.protected))
        s.logs["fusion.replaced"] = (fused != s.plabel).float().mean()
        s.plabel = fused

    def night_step(self, s: UDAStepState) -> None:
        """NFNet's losses: the prompt crop with its ground truth, then the dark mix."""
        if self.nfnet is None:
            return
        n = self.cfg.method.nfnet
        prompt, tgt = s.batches["prompt"], s.batches["target"]
        if n.prompt_loss:
            out, losses, logs = self.train_forward(self.nfnet, prompt["img"], prompt["seg"], prefix="night.prompt")
            s.logs.update(logs)
            self.nfnet.backward(losses["loss"])
            s.visuals.update(prompt_img=prompt["img"], prompt_seg=prompt["seg"],
                             prompt_pred=out["logits"][:1].argmax(1))
        if n.dark_mix:
            img, seg, _ = dark_mix(prompt["img"], prompt["seg"], tgt["img"], s.plabel, self.generator)
            img, seg = self.decorate_dark_mix(s, img, seg)
            img = self.augment(img)
            if n.ams and uses_ams(s.it):
                b, _, h, w = img.shape
                img = img * block_mask(b, h, w, n.ams_block_size, n.ams_ratio, self.generator, img.device)
            _, losses, logs = self.train_forward(self.nfnet, img, seg, prefix="night.mix")
            s.logs.update(logs)
            self.nfnet.backward(losses["loss"])

    # -- pieces ----------------------------------------------------------------------------
    def night_label(self, images):
        """The NFNet teacher's label: argmax of its pseudo-label forward, no threshold."""
        return self.teacher_logits(self.nfnet_teacher, self.nfnet, images).argmax(1)

    def decorate_dark_mix(self, s: UDAStepState, img, seg):
        """What a recipe adds to the dark mix before its colour augmentation (PIG: nothing;
        EGLP: rare-class patches)."""
        return img, seg
