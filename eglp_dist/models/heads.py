"""Decode heads: DAFormer's context-aware fusion head and DeepLabV3+.

Both take the encoder's list of feature levels (level 0 at stride 4) and return class logits
at stride 4. Layer layout and widths follow the references so that parameter counts match:

* DAFormer (Hoyer et al., CVPR 2022, ``daformer_head.py`` with ``daformer_sepaspp`` config):
  each level is embedded by a linear layer (a 1x1 conv with bias, no norm, no activation) to
  ``embed_dim`` channels, upsampled to stride 4 and concatenated; a depthwise-separable ASPP
  (1x1 branch for dilation 1, depthwise 3x3 + pointwise 1x1 for the others, each with BN and
  ReLU, no image pooling) is followed by a 3x3 bottleneck conv; Dropout2d; 1x1 classifier.
  HRDA's scale-attention head is the same head with a 1x1 conv fusion instead of the ASPP.
* DeepLabV3+ (Chen et al., ECCV 2018, as in RobustNet/MRFP ``deepv3.py``): ASPP with image
  pooling + 1x1 + dilated 3x3 branches on the last level, a 1x1 bottleneck, upsampling to the
  stride-4 level whose 1x1 projection (48 channels) is concatenated, two 3x3 convs, classifier.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize with ``align_corners=False`` (what mmseg configs use everywhere)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Sequential):
    """conv (no bias) + BatchNorm + ReLU: mmcv's ``ConvModule`` with BN and ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, dilation: int = 1, groups: int = 1):
        pad = dilation * (kernel // 2)
        super().__init__(
            nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )
        nn.init.kaiming_normal_(self[0].weight, mode="fan_out", nonlinearity="relu")


class SepConvBNReLU(nn.Sequential):
    """Depthwise 3x3 then pointwise 1x1, each with BN and ReLU (mmcv DepthwiseSeparableConvModule)."""

    def __init__(self, cin: int, cout: int, dilation: int):
        super().__init__(ConvBNReLU(cin, cin, 3, dilation=dilation, groups=cin), ConvBNReLU(cin, cout, 1))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: parallel branches, concatenated, then a bottleneck.

    ``separable`` selects depthwise-separable dilated branches (DAFormer) or plain dilated
    convs (DeepLab); ``image_pool`` adds the global-average branch (DeepLab);
    ``bottleneck_kernel`` is 3 in DAFormer and 1 in DeepLabV3+.
    """

    def __init__(self, cin: int, channels: int, dilations: Sequence[int], separable: bool,
                 image_pool: bool, bottleneck_kernel: int):
        super().__init__()
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBNReLU(cin, channels, 1)) if image_pool else None
        branches = []
        for d in dilations:
            if d == 1:
                branches.append(ConvBNReLU(cin, channels, 1))
            elif separable:
                branches.append(SepConvBNReLU(cin, channels, d))
            else:
                branches.append(ConvBNReLU(cin, channels, 3, dilation=d))
        self.branches = nn.ModuleList(branches)
        n = len(branches) + int(image_pool)
        self.bottleneck = ConvBNReLU(n * channels, channels, bottleneck_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        if self.image_pool is not None:
            outs.append(self.image_pool(x).expand(-1, -1, *x.shape[-2:]))
        outs.extend(b(x) for b in self.branches)
        return self.bottleneck(torch.cat(outs, dim=1))


class Classifier(nn.Module):
    """Dropout2d + 1x1 conv to class logits (mmseg ``cls_seg``; weights N(0, 0.01))."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.dropout(x))


class DAFormerHead(nn.Module):
    """DAFormer's decoder; ``fusion="aspp"`` (segmentation) or ``"conv"`` (HRDA attention)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, embed_dim: int = 256,
                 channels: int = 256, dilations: Sequence[int] = (1, 6, 12, 18),
                 dropout: float = 0.1, fusion: str = "aspp"):
        super().__init__()
        self.embed = nn.ModuleList(nn.Conv2d(c, embed_dim, 1) for c in in_channels)
        cat = embed_dim * len(in_channels)
        if fusion == "aspp":
            self.fuse = ASPP(cat, channels, dilations, separable=True, image_pool=False, bottleneck_kernel=3)
        elif fusion == "conv":
            self.fuse = ConvBNReLU(cat, channels, 1)
        else:
            raise ValueError(f"unknown DAFormer fusion {fusion!r}")
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        x = torch.cat([resize(e(f), size) for e, f in zip(self.embed, feats)], dim=1)
        return self.classifier(self.fuse(x))


class DeepLabV3PlusHead(nn.Module):
    """DeepLabV3+ decoder on the last level (ASPP) and the stride-4 level (skip)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 256,
                 dilations: Sequence[int] = (1, 6, 12, 18), low_level_channels: int = 48,
                 dropout: float = 0.0):
        super().__init__()
        self.aspp = ASPP(in_channels[-1], channels, dilations, separable=False, image_pool=True,
                         bottleneck_kernel=1)
        self.skip = ConvBNReLU(in_channels[0], low_level_channels, 1)
        self.refine = nn.Sequential(ConvBNReLU(channels + low_level_channels, channels, 3),
                                    ConvBNReLU(channels, channels, 3))
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        low = self.skip(feats[0])
        high = resize(self.aspp(feats[-1]), low.shape[-2:])
        return self.classifier(self.refine(torch.cat([low, high], dim=1)))


def build_head(head_cfg, in_channels: Sequence[int], num_classes: int, attention: bool = False,
               attention_embed_dim: int = 256) -> nn.Module:
    """The decode head of a ``HeadConfig``; ``attention=True`` gives HRDA's scale-attention
    head of the same type (DAFormer: ``attention_embed_dim`` wide, 1x1 conv fusion)."""
    if head_cfg.type == "daformer":
        if attention:
            return DAFormerHead(in_channels, num_classes, attention_embed_dim, attention_embed_dim,
                                dropout=head_cfg.dropout, fusion="conv")
        return DAFormerHead(in_channels, num_classes, head_cfg.embed_dim, head_cfg.channels,
                            head_cfg.dilations, head_cfg.dropout, fusion="aspp")
    if head_cfg.type == "deeplabv3plus":
        channels = attention_embed_dim if attention else head_cfg.channels
        return DeepLabV3PlusHead(in_channels, num_classes, channels, head_cfg.dilations,
                                 head_cfg.low_level_channels, head_cfg.dropout)
    raise ValueError(f"unknown head type {head_cfg.type!r}")
