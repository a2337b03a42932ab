"""SPN's training recipe (Li et al., "Stochastic Prompt Network for Sim-To-Real
Generalization"): domain generalisation, so supervised training on the synthetic source
(GTA5) alone, and evaluation on unseen real targets.

What the recipe is made of, and where each part lives:

* the network: SPN's multi-resolution encoder and MSFFP hybrid prompts are the model's
  (``models/spn.py``, ``model.spn``); prompts are drawn from this method's generator in
  training and are off in evaluation (``eval()``), so a checkpoint evaluates
  deterministically. The baseline (``configs/spn/gta2all_baseline.yaml``) is this recipe with
  ``model.spn.enabled=false``: the same DeepLabV3+ ResNet-50 on one resolution, no prompts;
* class-uniform sampling: the data engine's ``class_uniform`` mode (``data/sampling.py``);
* random scale, crop and flip: the source stream's pipeline (``data.source``);
* colour jitter and blur: the one phase this recipe overrides, :meth:`SPN.augment_source_step`
  (``methods/parts/dg_aug.py``, RobustNet's values);
* SGD with momentum and poly decay: the ``optim``/``schedule`` nodes of the config.

The sources of every value are in ``docs/spn.md``.
"""
from __future__ import annotations

from eglp_dist.errors import ConfigError
from eglp_dist.methods.parts.dg_aug import photometric_augment
from eglp_dist.methods.source_only import SourceOnly, SourceStepState


def check_dg_aug(c, key: str = "method.dg_aug") -> None:
    """What the field rules (probabilities, hue <= 0.5 turns) cannot say: the sigma range."""
    if len(c.blur_sigma) != 2 or not 0.0 < c.blur_sigma[0] <= c.blur_sigma[1]:
        raise ConfigError(f"{key}.blur_sigma: must be [lo, hi] with 0 < lo <= hi, got {list(c.blur_sigma)}")


class SPN(SourceOnly):
    """Source-only training with RobustNet's photometric augmentation (SPN's network and
    class-uniform sampling come from the config)."""

    def __init__(self, cfg, env, device):
        check_dg_aug(cfg.method.dg_aug)
        super().__init__(cfg, env, device)

    def augment_source_step(self, s: SourceStepState) -> None:
        """RobustNet's colour jitter and blur of the source batch (``method.dg_aug``)."""
        c, img = self.cfg.method.dg_aug, s.batches["source"]["img"]
        s.img = photometric_augment(img, self.mean, self.std, self.generator, c) if c.enabled else img
