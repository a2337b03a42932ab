"""SPN: a multi-resolution encoder whose fused features receive stochastic hybrid prompts.

Sources and how far each part is from them
------------------------------------------
SPN's public material is its authors' README; its code is not
public. The README says, in its own words, that SPN

  (R1) "uses multiple resolution inputs in the encoder to effectively combine coarse-grained
       and fine-grained information";
  (R2) adds "hybrid prompts ... by the multi-scale fusion feature stochastic prompt network
       (MSFFP) to enhance the model's immunity to semantic noise and extract more
       domain-invariant features";
  (R3) is trained on GTAV with class-uniform sampling (data side, ``data/sampling.py``).

Our issue adds: ResNet-50 DeepLabV3+ at output stride 16 (RobustNet's baseline, also MRFP's),
a shared encoder, fusion at several levels, and prompts that are a high-frequency part plus a
feature-statistics part, applied with a configurable probability in training only.

Everything else is **our reading**, taken from SPN's public ancestor MRFP (Udupa et al.,
CVPR 2024, "Multi-Resolution Feature Perturbation"), whose code perturbs a ResNet-50
DeepLabV3+ in training with (a) HRFP: a frozen conv encoder-decoder with BatchNorm and ReLU,
Kaiming-re-initialised on every use, whose output is *added* to early features, and (b) NP+:
``alpha * (f - mu) + beta * mu`` with per-sample, per-channel ``alpha, beta ~ N(1, 0.75)``
(beta's spread scaled by how much each channel's mean varies across the batch), each applied
with probability 0.5 per iteration at the stem and layer1 outputs. Concretely:

* R1 -> ``MultiResolutionEncoder``: the image is resized to each of ``input_scales`` (1, 0.5)
  and run through the *same* encoder stage by stage; at each of ``fuse_levels`` the coarser
  streams are upsampled to the full-resolution stream and fused by learnable per-channel
  weights (initialised to the mean, so pretrained features pass unchanged at step 0), and the
  fused feature continues through the full-resolution stream. [reading: where/how to fuse]
* R2 -> ``HybridPrompt`` on the fused features of ``prompt_levels`` (0, 1; MRFP's early
  levels): "hybrid" = high-frequency prompt (HRFP-like) + statistics prompt (NP/NP+), each
  switched on with ``prompt_prob`` (0.5) once per forward. [reading: the prompt functions,
  their hyper-parameters and placement are MRFP's]
* Training only: in eval mode nothing is random and the encoder is a deterministic
  multi-resolution encoder. [issue's words]

Randomness comes from an optional ``torch.Generator`` (``forward(x, generator)``), so a run
can be replayed; the prompt networks have no state at all (their weights are drawn when
used), so checkpoints, EMA teachers, DDP and ZeRO never see them.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from eglp_dist.device_constants import to_device_async
from eglp_dist.models.backbones import Encoder
from eglp_dist.models.heads import resize


def _randn(shape: Sequence[int], like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return to_device_async(torch.randn(tuple(shape), generator=generator, device=device), like.device, like.dtype)


def _uniform(generator: Optional[torch.Generator]) -> float:
    device = generator.device if generator is not None else "cpu"
    return float(torch.rand((), generator=generator, device=device).item())


def _random_conv_bn_relu(x: torch.Tensor, cout: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """3x3 conv with freshly drawn Kaiming-normal weights, batch-statistics BN, ReLU."""
    cin = x.shape[1]
    weight = _randn((cout, cin, 3, 3), x, generator) * (2.0 / (cin * 9)) ** 0.5
    y = F.conv2d(x, weight, padding=1)
    if y.shape[0] * y.shape[2] * y.shape[3] > 1:
        y = F.batch_norm(y, None, None, training=True)
    return F.relu(y)


def high_frequency_prompt(f: torch.Tensor, hidden: int, depth: int, scale: float,
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """MRFP's HRFP reading: a random, frozen conv encoder-decoder applied to ``f``.

    ``depth`` conv steps shrink the map by ``scale`` each, ``depth`` steps grow it back to
    ``f``'s size, the last one returning ``f``'s channels. Random kernels with BN and ReLU
    turn ``f`` into fine-grained, content-aligned noise; the caller adds it to ``f``.
    """
    size = tuple(f.shape[-2:])
    sizes = [size]
    for _ in range(depth):
        sizes.append(tuple(max(1, round(s * scale)) for s in sizes[-1]))
    x = f
    for k in range(1, depth + 1):  # encoder
        x = F.interpolate(_random_conv_bn_relu(x, hidden, generator), size=sizes[k], mode="bilinear",
                          align_corners=False)
    for k in range(depth - 1, -1, -1):  # decoder, last step back to f's channels
        x = _random_conv_bn_relu(x, f.shape[1] if k == 0 else hidden, generator)
        x = F.interpolate(x, size=sizes[k], mode="bilinear", align_corners=False)
    return x


def statistics_prompt(f: torch.Tensor, alpha_std: float, beta_std: float, mode: str = "np_plus",
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``alpha * (f - mu) + beta * mu`` with per-sample, per-channel ``alpha, beta ~ N(1, std)``.

    ``np_plus`` (MRFP) scales beta's noise per channel by the spread of that channel's mean
    across the batch (relative to the largest spread, times 1.5); with a batch of one it is
    plain ``np``. The spread is treated as a constant (no gradient through the noise level).
    """
    b, c = f.shape[:2]
    mu = f.mean(dim=(2, 3), keepdim=True)
    alpha = 1 + alpha_std * _randn((b, c, 1, 1), f, generator)
    noise = beta_std * _randn((b, c, 1, 1), f, generator)
    if mode == "np_plus" and b > 1:
        spread = mu.detach().std(dim=0, keepdim=True)
        noise = noise * (spread / spread.max().clamp_min(1e-12) * 1.5)
    return alpha * (f - mu) + (1 + noise) * mu


class HybridPrompt(nn.Module):
    """MSFFP's hybrid prompt: statistics prompt and/or high-frequency prompt (no parameters)."""

    def __init__(self, spn_cfg):
        super().__init__()
        self.cfg = spn_cfg

    def draw(self, generator: Optional[torch.Generator] = None) -> Tuple[bool, bool]:
        """Which prompts act in this forward: (high-frequency, statistics)."""
        c = self.cfg
        hf = c.hf_prompt and _uniform(generator) < c.prompt_prob
        stat = c.stat_prompt and _uniform(generator) < c.prompt_prob
        return hf, stat

    def forward(self, f: torch.Tensor, active: Tuple[bool, bool],
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        c = self.cfg
        hf, stat = active
        out = statistics_prompt(f, c.alpha_std, c.beta_std, c.stat_mode, generator) if stat else f
        if hf:  # MRFP adds the perturbation computed from the unperturbed feature
            out = out + high_frequency_prompt(f, c.hf_channels, c.hf_depth, c.hf_scale, generator)
        return out


class ScaleFusion(nn.Module):
    """Per-channel learnable mixture of one level's streams (full resolution first), coarser
    streams upsampled to it; initialised to their mean so pretrained features pass unchanged
    at the start. Per-channel weights (``streams x channels`` parameters) rather than a 1x1
    conv over the concatenation, which would add 11M parameters to a ResNet-50 at level 3.
    """

    def __init__(self, channels: int, num_streams: int):
        super().__init__()
        self.weight = nn.Parameter(torch.full((num_streams, 1, channels, 1, 1), 1.0 / num_streams))

    def forward(self, streams: List[torch.Tensor]) -> torch.Tensor:
        size = streams[0].shape[-2:]
        out = self.weight[0] * streams[0]
        for w, s in zip(self.weight[1:], streams[1:]):
            out = out + w * resize(s, size)
        return out


class MultiResolutionEncoder(nn.Module):
    """The shared ``Encoder`` on several input resolutions, fused (and prompted) per level.

    Same interface as ``Encoder``: ``forward(x, generator) -> levels``, ``channels``,
    ``reductions`` (of the full-resolution stream). Works for any input size: coarser
    streams are resized to the full-resolution stream's size at each fused level.
    """

    def __init__(self, encoder: Encoder, spn_cfg):
        super().__init__()
        self.encoder = encoder
        self.scales = [float(s) for s in spn_cfg.input_scales]
        self.fuse_levels = sorted(set(int(lvl) for lvl in spn_cfg.fuse_levels)) if len(self.scales) > 1 else []
        self.prompt_levels = set(int(lvl) for lvl in spn_cfg.prompt_levels)
        self.fusions = nn.ModuleDict({str(lvl): ScaleFusion(encoder.channels[lvl], len(self.scales))
                                      for lvl in self.fuse_levels})
        self.prompt = HybridPrompt(spn_cfg) if (spn_cfg.hf_prompt or spn_cfg.stat_prompt) else None
        self.channels = encoder.channels
        self.reductions = encoder.reductions

    @property
    def num_levels(self) -> int:
        return self.encoder.num_levels

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
        streams = [x] + [F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
                         for s in self.scales[1:]]
        active = self.prompt.draw(generator) if (self.training and self.prompt is not None) else (False, False)
        last_fused = self.fuse_levels[-1] if self.fuse_levels else -1
        feats = []
        for i in range(self.encoder.num_levels):
            streams = [self.encoder.stage(i, s) for s in streams]
            if str(i) in self.fusions:
                streams[0] = self.fusions[str(i)](streams)
            if any(active) and i in self.prompt_levels:
                streams[0] = self.prompt(streams[0], active, generator)
            feats.append(streams[0])
            if i >= last_fused:
                streams = streams[:1]  # coarser streams are not needed any more
        return feats
