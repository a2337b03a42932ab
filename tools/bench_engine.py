#!/usr/bin/env python
"""Optimizer memory and step time per rank: DDP vs DeepSpeed ZeRO-1 vs ZeRO-2, side by side.

Spawns `--ranks` gloo processes on this machine (NCCL where CUDA is visible is the same
code), builds the same model under each engine, runs a few optimizer steps and reports per
rank: Adam moment bytes (exp_avg + exp_avg_sq), fp32 master copies DeepSpeed keeps apart
from the model's parameters, and the median seconds per step, with ratios to DDP.

    python tools/bench_engine.py --ranks 2 --width 256 --steps 5
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

import eglp_dist  # noqa: F401  (the torchvision import shim, before timm)

KINDS = ["ddp", "zero1", "zero2"]


class MLPSeg(nn.Module):
    """A stand-in with a segmentor's parameter layout (encoder + 10x-lr head)."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.encoder = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(depth)])
        self.head = nn.Linear(width, 19)

    def forward_train(self, x, y):
        return nn.functional.cross_entropy(self.head(self.encoder(x)), y)

    def param_groups(self, lr, wd, mult=10.0):
        return [{"params": list(self.encoder.parameters()), "lr": lr},
                {"params": list(self.head.parameters()), "lr": lr * mult}]


def _work(env, width, depth, steps):
    from omegaconf import OmegaConf

    from eglp_dist.config import EngineConfig, OptimConfig, ScheduleConfig
    from eglp_dist.runtime import comm
    from eglp_dist.runtime.engine import build_engine

    rows = {}
    for kind in KINDS:
        torch.manual_seed(0)
        model = MLPSeg(width, depth)
        eng = build_engine(kind, model, model.param_groups(1e-4, 0.01), OmegaConf.structured(OptimConfig()),
                           OmegaConf.structured(ScheduleConfig(warmup_iters=0)), 100,
                           OmegaConf.structured(EngineConfig(kind=kind)), env, torch.device("cpu"))
        times = []
        for step in range(steps + 1):
            x = torch.randn(64, width)
            y = torch.randint(0, 19, (64,))
            comm.barrier()
            t0 = time.perf_counter()
            eng.backward(eng.call("forward_train", x, y))
            eng.step()
            comm.barrier()
            if step:  # the first step allocates optimizer state
                times.append(time.perf_counter() - t0)
        params = sum(p.numel() for p in model.parameters())
        rows[kind] = dict(params=params, **eng.optimizer_state_bytes(), step_s=statistics.median(times))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args(argv)
    from eglp_dist.runtime.spawn import run_ranks

    rows = run_ranks(_work, a.ranks, args=(a.width, a.depth, a.steps))[0]
    ddp = rows["ddp"]
    print(f"model: {ddp['params']:,} parameters, {a.ranks} ranks (gloo, CPU), fp32")
    print(f"{'engine':<7}{'Adam moments/rank':>19}{'x DDP':>7}{'+fp32 master/rank':>19}{'x DDP':>7}"
          f"{'s/step':>9}{'x DDP':>7}")
    for kind in KINDS:
        r = rows[kind]
        total = r["moments"] + r["master"]
        print(f"{kind:<7}{r['moments'] / 2**20:>16.2f}MiB{r['moments'] / ddp['moments']:>7.3f}"
              f"{total / 2**20:>16.2f}MiB{total / ddp['moments']:>7.3f}{r['step_s']:>9.4f}"
              f"{r['step_s'] / ddp['step_s']:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
