"""Optimizer memory and step time per rank: DDP vs DeepSpeed ZeRO-1 vs ZeRO-2, side by side.

Spawns `--ranks` gloo processes on this machine, builds the same model under each engine in
the same processes and interleaves their steps (order rotating each round,
``eglp_dist.benchmarking``), so a change of machine load hits all three alike; reports per
rank: Adam moment bytes (exp_avg + exp_avg_sq), fp32 master copies DeepSpeed keeps apart
from the model's parameters, and the seconds per step, median [min-max], with the median of
the paired per-round ratios to DDP and the load average at start and end.

    python tools/bench_engine.py --ranks 2 --width 256 --steps 16
"""
from __future__ import annotations

import argparse

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


def _work(env, width, depth, warmup, steps):
    from omegaconf import OmegaConf

    from eglp_dist import benchmarking as B
    from eglp_dist.config import EngineConfig, OptimConfig, ScheduleConfig
    from eglp_dist.runtime import comm
    from eglp_dist.runtime.engines import build_engine

    load_start = B.load_average()
    engines, params = {}, 0
    for kind in KINDS:
        torch.manual_seed(0)
        model = MLPSeg(width, depth)
        params = sum(p.numel() for p in model.parameters())
        engines[kind] = build_engine(kind, model, model.param_groups(1e-4, 0.01), OmegaConf.structured(OptimConfig()),
                                     OmegaConf.structured(ScheduleConfig(warmup_iters=0)), 100,
                                     OmegaConf.structured(EngineConfig(kind=kind)), env, torch.device("cpu"))
    g = torch.Generator().manual_seed(env.rank)
    batches = [(torch.randn(64, width, generator=g), torch.randint(0, 19, (64,), generator=g)) for _ in range(2)]

    def step(kind):
        def run(r):
            eng = engines[kind]
            eng.backward(eng.call("forward_train", *batches[r % 2]))
            eng.step()
            comm.barrier()  # the step ends when the slowest rank's does
        return run

    # each step starts together on every rank (the barrier is untimed)
    times = B.interleave({k: step(k) for k in KINDS}, warmup, steps, align=comm.barrier)  # the first step allocates Adam's state
    summary = B.summarise(times, "ddp")
    return {"params": params, "load": [load_start, B.load_average()], "times": times,
            "rows": {k: dict(**engines[k].optimizer_state_bytes(), step=summary[k]) for k in KINDS}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=16, help="timed rounds (each engine once per round)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the raw figures here")
    a = p.parse_args(argv)
    from eglp_dist import benchmarking as B
    from eglp_dist.runtime.spawn import run_ranks

    per_rank = run_ranks(_work, a.ranks, args=(a.width, a.depth, a.warmup, a.steps))
    print(f"model: {per_rank[0]['params']:,} parameters, {a.ranks} ranks (gloo, CPU), fp32; engines interleaved, "
          f"order rotating: {a.warmup} warm-up + {a.steps} timed rounds")
    print(f"{'engine':<7}{'rank':>5}{'Adam moments':>15}{'x DDP':>7}{'+fp32 master':>15}{'x DDP':>7}"
          f"{'s/step [min-max]':>26}{'paired x DDP':>22}")
    for rank, res in enumerate(per_rank):
        ddp = res["rows"]["ddp"]
        for kind in KINDS:
            r = res["rows"][kind]
            total = r["moments"] + r["master"]
            print(f"{kind:<7}{rank:>5}{r['moments'] / 2**20:>12.2f}MiB{r['moments'] / ddp['moments']:>7.3f}"
                  f"{total / 2**20:>12.2f}MiB{total / ddp['moments']:>7.3f}"
                  f"{B.format_spread(r['step']['wall'], 4):>26}{B.format_spread(r['step']['ratio'], 2):>22}")
    print("load average (1 min) at start, end, per rank: " + "; ".join(f"{r['load'][0]}, {r['load'][1]}"
                                                                      for r in per_rank))
    B.write_json(a.json, {"args": vars(a), "per_rank": per_rank})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
