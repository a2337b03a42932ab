"""Optimizer and learning-rate schedule, as DAFormer/HRDA configure them in mmseg:
AdamW (lr 6e-5, betas 0.9/0.999, wd 0.01, decode head at 10x lr) with a linear warm-up over
1500 iterations from ``warmup_ratio * lr`` and a polynomial decay (power 1) to ``min_lr``.

The schedule is a pure function of the iteration, so resuming only needs the iteration.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List

import torch


def build_optimizer(param_groups: Iterable[Dict[str, Any]], cfg) -> torch.optim.Optimizer:
    """`param_groups` carry their own `lr` (and `weight_decay`) as the model sets them
    (heads at head_lr_mult x lr, no decay on norms); cfg is an OptimConfig."""
    groups: List[Dict[str, Any]] = [dict(g) for g in param_groups]
    for g in groups:
        g.setdefault("lr", cfg.lr)
        g.setdefault("weight_decay", cfg.weight_decay)
    if cfg.name == "adamw":
        # foreach=True: one fused multi-tensor kernel per group; same maths as the loop.
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas),
                                 weight_decay=cfg.weight_decay, foreach=True)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(it: int, max_iters: int, cfg) -> float:
    """Multiplier of the base lr at iteration `it` (0-based, the one about to be taken).

    mmcv's poly policy with linear warm-up: the regular lr is
    ``(base - min) * (1 - it/max)^power + min``, and during warm-up it is scaled by
    ``1 - (1 - it/warmup) * (1 - warmup_ratio)``."""
    it = min(it, max_iters)
    regular = (1.0 - cfg.min_lr_ratio) * (1.0 - it / max_iters) ** cfg.power + cfg.min_lr_ratio
    if it < cfg.warmup_iters:
        k = (1.0 - it / cfg.warmup_iters) * (1.0 - cfg.warmup_ratio)
        return regular * (1.0 - k)
    return regular


def build_scheduler(optimizer: torch.optim.Optimizer, max_iters: int, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    fn: Callable[[int], float] = lambda it: lr_factor(it, max_iters, cfg)  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
