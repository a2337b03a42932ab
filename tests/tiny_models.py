"""Small deterministic models for the engine tests: a conv 'encoder' and a 'head', so the
10x head learning-rate group is exercised like a segmentor's."""
from __future__ import annotations

import torch
import torch.nn as nn


class TinySeg(nn.Module):
    def __init__(self, width: int = 8, classes: int = 3, batch_norm: bool = False):
        super().__init__()
        norm = nn.BatchNorm2d(width) if batch_norm else nn.LayerNorm([width, 8, 8])
        self.encoder = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.GELU(),
                                     nn.Conv2d(width, width, 3, padding=1), norm)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        return self.head(self.encoder(x))

    def forward_train(self, x, y):
        return nn.functional.cross_entropy(self(x), y)

    def param_groups(self, lr: float, weight_decay: float, head_lr_mult: float = 10.0):
        return [{"params": list(self.encoder.parameters()), "lr": lr, "weight_decay": weight_decay},
                {"params": list(self.head.parameters()), "lr": lr * head_lr_mult, "weight_decay": weight_decay}]


def make_tiny(seed: int = 0, batch_norm: bool = False) -> TinySeg:
    torch.manual_seed(seed)
    return TinySeg(batch_norm=batch_norm)


def batch(rank: int, step: int, n: int = 2):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (n, 8, 8), generator=g)
    return x, y
