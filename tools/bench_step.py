#!/usr/bin/env python
"""Seconds per training iteration and peak memory per rank, methods side by side:

* ``--suite uda`` (default): source-only vs UDA vs PIG-style vs EGLP, with the share of the
  PIG step spent on its class-similarity ranking and of the EGLP step spent in its one
  statistics all-reduce (DNIS + RCM sums);
* ``--suite spn``: the DG baseline (DeepLabV3+, one resolution, no prompts) vs SPN
  (multi-resolution encoder + MSFFP prompts), same recipe (RobustNet's augmentation).

Spawns ``--ranks`` processes (gloo on CPU, NCCL where CUDA is visible: the same code), builds
each method from the given config exactly as ``eglp train`` does (same engines, EMA teacher,
frozen ImageNet copy) and drives ``method.step`` with pre-made batches of the configured
crop and batch size, so the number is the step itself, not data loading (that is
``bench_loader.py``). Peak memory is ``torch.cuda.max_memory_allocated`` on GPU and the
process's peak resident set (ru_maxrss, which includes the interpreter and libraries) on CPU.

    python tools/bench_step.py --config configs/demo/tiny_pig.yaml --ranks 2 --iters 10
    python tools/bench_step.py --config configs/demo/tiny_pig.yaml model=tiny_daformer
    python tools/bench_step.py --suite spn            # configs/demo/tiny_spn.yaml
    python tools/bench_step.py --suite spn --config configs/spn/gta2all.yaml model.pretrained=null

Suite uda's config is the EGLP one (it holds the UDA recipe, the prompt stream, PIG's and
EGLP's parts); each method is that config with ``method.name`` set, so all share data
shapes, model and schedule. PIG runs with its similarity fusion on
(``method.fusion.enabled=true``), as in tiny_pig.yaml; EGLP with DNIS instead. Suite spn's
baseline is the SPN config with ``model.spn.enabled=false``, as gta2all_baseline.yaml.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from eglp_dist.config import PACKAGE_CONFIG_ROOT

# suite -> (default config, [(row name, overrides)]); the first row is the reference
SUITES = {
    "uda": ("tiny_eglp", [("source_only", ["method.name=source_only"]), ("uda", ["method.name=uda"]),
                          ("pig", ["method.name=pig", "method.fusion.enabled=true"]),
                          ("eglp", ["method.name=eglp"])]),
    "spn": ("tiny_spn", [("baseline", ["model.spn.enabled=false"]), ("spn", [])]),
}


def fake_batch(stream_cfg, num_classes: int, device, generator: torch.Generator) -> dict:
    b, (h, w) = stream_cfg.batch_size, stream_cfg.crop_size
    img = torch.randn(b, 3, h, w, generator=generator).to(device)
    seg = torch.randint(0, num_classes, (b, h, w), generator=generator).to(device)
    return {"img": img, "seg": seg, "meta": [{}] * b}


def _timed(fn, device, spent: list):
    """``fn`` that also appends its seconds (GPU work included) to ``spent``."""
    def timed(*args):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        spent.append(time.perf_counter() - t0)
        return out
    return timed


def _time_similarity(method, device) -> list:
    """Seconds of each call of the method's similarity ranking (if it has one)."""
    spent: list = []
    if getattr(method, "similarity", None) is not None:
        method.similarity = _timed(method.similarity, device, spent)
    return spent


def _time_reduction(device) -> list:
    """Seconds of every comm.all_reduce_sum (within a step, only EGLP's statistics)."""
    from eglp_dist.runtime import comm

    spent: list = []
    comm.all_reduce_sum = _timed(comm.all_reduce_sum, device, spent)
    return spent


def _work(env, config, overrides, name, warmup, iters):
    """One method in fresh processes, so each one's peak memory is its own."""
    from eglp_dist.config import load_config
    from eglp_dist.methods import build_method

    from eglp_dist.runtime.env import current_device

    device = current_device(env)
    cfg = load_config(config, list(overrides))
    method = build_method(cfg, env, device)
    g = torch.Generator().manual_seed(env.rank)
    batches = [{s: fake_batch(getattr(cfg.data, s), cfg.model.num_classes, device, g)
                for s in method.streams} for _ in range(2)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ranking = _time_similarity(method, device)
    reduction = _time_reduction(device) if cfg.method.name == "eglp" else []
    times = []
    for it in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        logs = method.step(batches[it % 2], it)
        float(sum(v.float() for v in logs.values()))  # wait for the step, as a log would
        if it >= warmup:
            times.append(time.perf_counter() - t0)
        else:
            ranking.clear()
            reduction.clear()
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"s_per_iter": statistics.median(times), "peak_bytes": peak,
            "ranking_share": sum(ranking) / sum(times) if ranking else None,
            "reduce_share": sum(reduction) / sum(times) if reduction else None,
            "params": sum(p.numel() for p in method.student.model.parameters()),
            "model": cfg.model.name, "batch": cfg.data.source.batch_size,
            "crop": list(cfg.data.source.crop_size)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="uda", choices=list(SUITES))
    p.add_argument("--config", default=None, help="default: configs/demo/tiny_eglp.yaml (uda), tiny_spn.yaml (spn)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=8)
    a = p.parse_args(argv)
    from eglp_dist.runtime.spawn import run_ranks

    default_config, variants = SUITES[a.suite]
    config = a.config or str(PACKAGE_CONFIG_ROOT / "demo" / f"{default_config}.yaml")
    names = [n for n, _ in variants]
    by_method = {n: run_ranks(_work, a.ranks, args=(config, [*a.overrides, *extra], n, a.warmup, a.iters),
                              backend="auto")
                 for n, extra in variants}
    per_rank = [{n: by_method[n][r] for n in names} for r in range(a.ranks)]
    ref = names[0]
    first = per_rank[0][ref]
    kind = "CUDA" if torch.cuda.is_available() else "CPU, gloo"
    print(f"{config}: model {per_rank[0][names[-1]]['model']}, batch {first['batch']}/rank, "
          f"crop {first['crop']}, {a.ranks} ranks ({kind}), median of {a.iters} iterations")
    mem = "peak alloc" if torch.cuda.is_available() else "peak RSS"
    uda = "uda" if "uda" in names else None
    rx = f"x {ref[:5]}"
    print(f"{'method':<12}{'rank':>5}{'s/iter':>9}{rx:>9}" + (f"{'x uda':>7}" if uda else "") + f"{mem:>13}{rx:>9}"
          + (f"{'x uda':>7}{'ranking':>9}{'reduce':>8}" if uda else "") + f"{'params':>12}")
    for rank, rows in enumerate(per_rank):
        base = rows[ref]
        for name in names:
            r = rows[name]
            line = f"{name:<12}{rank:>5}{r['s_per_iter']:>9.3f}{r['s_per_iter'] / base['s_per_iter']:>9.2f}"
            if uda:
                line += f"{r['s_per_iter'] / rows[uda]['s_per_iter']:>7.2f}"
            line += f"{r['peak_bytes'] / 2**20:>10.0f}MiB{r['peak_bytes'] / base['peak_bytes']:>9.2f}"
            if uda:
                share = "" if r["ranking_share"] is None else f"{100 * r['ranking_share']:.1f}%"
                red = "" if r["reduce_share"] is None else f"{100 * r['reduce_share']:.2f}%"
                line += f"{r['peak_bytes'] / rows[uda]['peak_bytes']:>7.2f}{share:>9}{red:>8}"
            print(line + f"{r['params']:>12,}")
    if uda:
        print("ranking: share of the step in the class-similarity ranking (PIG's fusion); reduce: share of the "
              "step in EGLP's one statistics all-reduce (DNIS + RCM sums)")
        ratios = [rows["eglp"]["s_per_iter"] / rows["pig"]["s_per_iter"] for rows in per_rank]
        print(f"EGLP / PIG step time: {', '.join(f'{x:.2f}' for x in ratios)} (per rank)")
    else:
        ratios = [rows[names[-1]]["s_per_iter"] / rows[ref]["s_per_iter"] for rows in per_rank]
        print(f"{names[-1]} / {ref} step time: {', '.join(f'{x:.2f}' for x in ratios)} (per rank)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
