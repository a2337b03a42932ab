"""Encoders: timm feature networks (``features_only=True``) seen as four stages.

One class serves MiT and ResNet alike. timm's ``FeatureListNet`` is an ordered dict of
modules; we cut it after each returned layer, so stage ``i`` maps the previous stage's
output to feature level ``i`` (strides 4, 8, 16, 32, or 4, 8, 8, 8 / 4, 8, 16, 16 for dilated
ResNets). Running stage by stage (rather than calling the net) is what lets SPN fuse
resolutions and insert prompts between stages, and what grad checkpointing wraps.

MiT: SegFormer's Mix Transformer is timm's ``pvt_v2`` architecture (overlapping patch
embeddings, spatial-reduction attention, Mix-FFN with a depthwise conv, LayerNorm eps 1e-6,
linearly increasing drop path). timm's ``pvt_v2_b0..b4`` use MLP ratios (8, 8, 4, 4) as
PVTv2 does, SegFormer's MiT uses 4 everywhere; ``mit_bN`` therefore builds ``pvt_v2_bN`` with
``mlp_ratios=(4, 4, 4, 4)`` (for b5 the two are identical). Weights come only from a local
file in either key layout (see ``convert.py``); nothing is downloaded.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from eglp_dist.errors import ConfigError, UserError
from eglp_dist.models import convert

MIT_MLP_RATIOS = (4, 4, 4, 4)


def timm_name(name: str) -> str:
    """The timm model behind an encoder name (``mit_bN`` -> ``pvt_v2_bN``)."""
    if re.fullmatch(r"mit_b[0-5]", name):
        return "pvt_v2_" + name[len("mit_"):]
    return name


class Encoder(nn.Module):
    """A timm feature network run stage by stage; ``forward`` returns the four feature levels.

    Attributes: ``channels`` and ``reductions`` (stride) of each level.
    """

    def __init__(self, net: nn.Module, name: str):
        super().__init__()
        self.net = net
        self.name = name
        stages: List[List[str]] = []
        pending: List[str] = []
        for module_name in net.keys():
            pending.append(module_name)
            if module_name in net.return_layers:
                stages.append(pending)
                pending = []
        self.stage_modules = stages
        self.channels: List[int] = list(net.feature_info.channels())
        self.reductions: List[int] = list(net.feature_info.reduction())
        self.grad_checkpointing = False

    @property
    def num_levels(self) -> int:
        return len(self.stage_modules)

    def _run(self, i: int, x: torch.Tensor) -> torch.Tensor:
        for module_name in self.stage_modules[i]:
            x = self.net[module_name](x)
        return x

    def stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Feature level ``i`` from level ``i - 1`` (or from the image for ``i == 0``)."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._run, i, x, use_reentrant=False)
        return self._run(i, x)

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
        """Feature levels of ``x``. ``generator`` is accepted (and unused) so that every
        encoder, stochastic ones included (SPN), has one call signature."""
        feats = []
        for i in range(self.num_levels):
            x = self.stage(i, x)
            feats.append(x)
        return feats

    # -- weights -----------------------------------------------------------------------
    def _feature_key(self, key: str) -> str:
        """timm-model key -> key inside the FeatureListNet, which flattens first-level
        Sequentials (``stages.0.blocks`` -> ``stages_0.blocks``)."""
        parts = key.split(".")
        if parts[0] not in self.net and len(parts) > 2 and parts[1].isdigit():
            flat = f"{parts[0]}_{parts[1]}"
            if flat in self.net:
                return ".".join([flat] + parts[2:])
        return key

    def _timm_key(self, key: str) -> str:
        """Inverse of ``_feature_key``: FeatureListNet key -> timm-model key."""
        head, _, rest = key.partition(".")
        m = re.fullmatch(r"(.+)_(\d+)", head)
        if m:
            dotted = f"{m.group(1)}.{m.group(2)}.{rest}"
            if self._feature_key(dotted) == key:
                return dotted
        return key

    def timm_state_dict(self) -> Dict[str, torch.Tensor]:
        """This encoder's weights with timm-model key names (what ``convert-mit`` writes)."""
        return {self._timm_key(k): v for k, v in self.net.state_dict().items()}

    def load_timm_state_dict(self, sd: Dict[str, torch.Tensor], source: str = "<state dict>",
                             origins: Optional[Dict[str, str]] = None) -> None:
        """Load timm-layout weights strictly; errors name the file and the keys.

        ``origins`` maps a timm key to its name in the file (for SegFormer-layout files), so
        messages name the key the user can find. The ImageNet classifier (``head``/``fc``) is
        dropped. BatchNorm ``num_batches_tracked`` counters may be absent (torchvision
        weights) and then start at 0.
        """
        origins = origins or {}
        mapped, named = {}, {}
        for key, value in sd.items():
            if key.split(".", 1)[0] in convert.CLASSIFIER_MODULES:
                continue
            fkey = self._feature_key(key)
            mapped[fkey] = value
            named[fkey] = origins.get(key, key)
        own = self.net.state_dict()
        missing = [self._timm_key(k) for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
        unexpected = [named[k] for k in mapped if k not in own]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
            raise UserError(f"{source}: weights do not fit encoder {self.name}: {'; '.join(parts)}")
        for k, v in mapped.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise UserError(f"{source}: {named[k]} has shape {tuple(v.shape)}, encoder "
                                f"{self.name} expects {tuple(own[k].shape)}")
        for k in own:
            if k not in mapped:
                mapped[k] = torch.zeros_like(own[k])
        self.net.load_state_dict(mapped, strict=True)


def create_encoder(
    name: str,
    *,
    drop_path_rate: float = 0.0,
    output_stride: Optional[int] = None,
    stem: str = "",
    extra: Optional[Dict] = None,
) -> Encoder:
    """A randomly initialised encoder (``pretrained=False`` always; weights come from files)."""
    import timm

    kwargs = dict(extra or {})
    base = timm_name(name)
    if base != name:
        kwargs.setdefault("mlp_ratios", MIT_MLP_RATIOS)
    if not timm.is_model(base):
        raise ConfigError(f"model.encoder: {name!r} is not a timm model (nor mit_b0..mit_b5)")
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if output_stride is not None and output_stride != 32:
        kwargs["output_stride"] = output_stride
    if stem == "deep":
        kwargs.update(stem_type="deep", stem_width=64)
    try:
        net = timm.create_model(base, pretrained=False, features_only=True,
                                out_indices=(-4, -3, -2, -1), **kwargs)
    except TypeError as exc:
        raise ConfigError(f"model.encoder_kwargs: timm {base} rejects {sorted(kwargs)}: {exc}") from None
    except (AssertionError, ValueError) as exc:
        raise ConfigError(f"model.output_stride: {base} cannot be built with {kwargs}: {exc}") from None
    encoder = Encoder(net, name)
    if encoder.reductions[0] != 4:
        raise ConfigError(f"model.encoder: {name} has its first feature level at stride "
                          f"{encoder.reductions[0]}; the decode heads need stride 4")
    return encoder


def load_encoder_weights(encoder: Encoder, path: str) -> None:
    """Load a local weight file in timm or SegFormer layout into ``encoder`` (strict)."""
    sd, origins = convert.to_timm_layout(convert.read_state_dict(path))
    encoder.load_timm_state_dict(sd, source=path, origins=origins)


def build_encoder(cfg) -> Encoder:
    """The encoder described by a ``ModelConfig``, with its pretrained weights if named."""
    encoder = create_encoder(
        cfg.encoder,
        drop_path_rate=cfg.drop_path_rate,
        output_stride=cfg.output_stride,
        stem=cfg.stem,
        extra=dict(cfg.encoder_kwargs),
    )
    encoder.grad_checkpointing = bool(cfg.grad_checkpointing)
    if cfg.pretrained:
        load_encoder_weights(encoder, cfg.pretrained)
    return encoder


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = ["Encoder", "create_encoder", "build_encoder", "load_encoder_weights", "timm_name",
           "count_parameters"]
