"""Networks built from config by name: encoders, decode heads, HRDA wrapper, SPN.

``build_segmentor(model_cfg)`` is the one entry point; see docs/models.md for the interface
the training loop uses (``forward``/``predict``/``encode``/``forward_train``/``losses``/
``param_groups``).
"""
from __future__ import annotations

from typing import Any

from eglp_dist.models.config import HRDAConfig, HeadConfig, ModelConfig, SPNConfig, as_model_config, load_model_config


def build_segmentor(model_cfg: Any):
    """A ``Segmentor`` (or ``HRDASegmentor``) from a ``ModelConfig``, OmegaConf node or dict.

    Construction is deterministic given ``torch.manual_seed``; pretrained encoder weights are
    read from ``model_cfg.pretrained`` if set (never downloaded), then the whole model's from
    ``model_cfg.init_from`` if set (the student engine of a checkpoint, or a weight file).
    """
    cfg = as_model_config(model_cfg)
    model = _build(cfg)
    if cfg.init_from:
        from eglp_dist.weights import load_into, load_weights

        load_into(model, load_weights(cfg.init_from), f"model.init_from={cfg.init_from}")
    return model


def _build(cfg):
    from eglp_dist.models.backbones import build_encoder
    from eglp_dist.models.heads import build_head
    from eglp_dist.models.hrda import HRDASegmentor
    from eglp_dist.models.segmentor import Segmentor
    from eglp_dist.models.spn import MultiResolutionEncoder

    encoder = build_encoder(cfg)
    if cfg.spn.enabled:
        encoder = MultiResolutionEncoder(encoder, cfg.spn)
    head = build_head(cfg.head, encoder.channels, cfg.num_classes)
    if not cfg.hrda.enabled:
        return Segmentor(cfg, encoder, head)
    attention = None
    if cfg.hrda.fixed_attention is None:
        outputs = cfg.num_classes if cfg.hrda.attention_classwise else 1
        attention = build_head(cfg.head, encoder.channels, outputs, attention=True,
                               attention_embed_dim=cfg.hrda.attention_embed_dim)
    return HRDASegmentor(cfg, encoder, head, attention)


__all__ = ["build_segmentor", "ModelConfig", "HeadConfig", "HRDAConfig", "SPNConfig",
           "as_model_config", "load_model_config"]
