"""Seconds per training iteration, methods side by side in the same ranks:

* ``--suite uda`` (default): source-only vs UDA vs PIG-style vs EGLP, with the share of the
  PIG step spent on its class-similarity ranking and of the EGLP step spent waiting for its
  one statistics all-reduce (DNIS + RCM sums);
* ``--suite spn``: the DG baseline (DeepLabV3+, one resolution, no prompts) vs SPN
  (multi-resolution encoder + MSFFP prompts), same recipe (RobustNet's augmentation).

Every row is built in the same ``--ranks`` processes (gloo on CPU, NCCL where CUDA is
visible), exactly as ``eglp train`` builds it (engines, EMA teacher, NFNet), and the rows'
steps are interleaved, the order rotating each round (``eglp_dist.benchmarking``): a change
of machine load slows both sides of a pair alike, so the **paired per-round ratio** to the
reference row (the first) is the figure to read, printed per rank as median [min-max],
beside each row's own wall and CPU seconds and the load average at start and end. The
closing ``EGLP / PIG`` line is that paired ratio. The step is timed on pre-made batches (data
loading is ``bench_loader.py``): synthetic street scenes rendered at the crop size, so
labels hold the classes and areas of a street crop (not uniform noise that puts every rare
class in every image; the loader's rare-class sampling is not applied).

``--weak-scaling``: every row also built as a one-rank job (world of 1: no DDP wrapper,
the runtime sees no process group, so no collective) and interleaved with the others in the
same processes; the paired ratio N-rank step / one-rank step is the cost of running on N
ranks with the per-rank batch unchanged: gradient reduction, the statistics reduction, and
waiting for the slowest rank (on CPU both kinds of row run on all ranks at once, so they
share the cores alike; DDP engines only).

``--memory``: each row's peak memory, measured in a fresh process group per row (one
after another: memory does not depend on the machine's load) over 2 steps:
``torch.cuda.max_memory_allocated`` on GPU, the peak resident set (ru_maxrss, interpreter
and libraries included) on CPU. ``--count-collectives``: per row and iteration, every
collective, its bytes and the code that asked for it (``benchmarking.CollectiveCounter``),
counted over 2 steps after the timed ones on rows built afresh. ``--json PATH``: the raw
per-round figures.

    python tools/bench_step.py --ranks 2                       # = eglp bench step --ranks 2
    python tools/bench_step.py --ranks 2 --count-collectives --memory --json runs/bench_step.json
    python tools/bench_step.py --suite spn                     # configs/demo/tiny_spn.yaml
    python tools/bench_step.py --config configs/demo/tiny_pig.yaml model=tiny_daformer

Suite uda's config is the EGLP one (it holds the UDA recipe, the prompt stream, PIG's and
EGLP's parts); each row is that config with ``method.name`` set, so all share data shapes,
model and schedule. PIG runs with its similarity fusion on (``method.fusion.enabled=true``),
as in tiny_pig.yaml; EGLP with DNIS instead. Suite spn's baseline is the SPN config with
``model.spn.enabled=false``, as gta2all_baseline.yaml.
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from eglp_dist import benchmarking as B
from eglp_dist.config import PACKAGE_CONFIG_ROOT

# suite -> (default config, [(row name, overrides)]); the first row is the reference
SUITES = {
    "uda": ("tiny_eglp", [("source_only", ["method.name=source_only"]), ("uda", ["method.name=uda"]),
                          ("pig", ["method.name=pig", "method.fusion.enabled=true"]),
                          ("eglp", ["method.name=eglp"])]),
    "spn": ("tiny_spn", [("baseline", ["model.spn.enabled=false"]), ("spn", [])]),
}
STYLES = {"source": "day", "target": "night", "prompt": "night"}


def scene_batch(stream_cfg, data_cfg, style: str, device, seed: int, start: int, ground_truth: bool) -> dict:
    """A batch of synthetic street scenes at the stream's crop size, normalised as the
    loader normalises (``gt`` = the labels, for a stream the method reads diagnostics from)."""
    from eglp_dist.data.planning import normalise_into
    from eglp_dist.data.offline.synth import sample

    b, (h, w) = stream_cfg.batch_size, stream_cfg.crop_size
    images, labels = zip(*(sample(seed, "bench", start + i, (w, h), style) for i in range(b)))
    img = normalise_into(torch.zeros(b, 3, h, w, device=device), images, data_cfg.mean, data_cfg.std)
    seg = torch.from_numpy(np.stack(labels)).long().to(device)
    batch = {"img": img, "seg": seg, "meta": [{}] * b}
    if ground_truth:
        batch["gt"] = seg
    return batch


def fake_batch(stream_cfg, num_classes: int, device, generator: torch.Generator) -> dict:
    """Random images and uniform random labels (the GPU check's memory probe: the worst
    case for per-class work, every class in every image)."""
    b, (h, w) = stream_cfg.batch_size, stream_cfg.crop_size
    img = torch.randn(b, 3, h, w, generator=generator).to(device)
    seg = torch.randint(0, num_classes, (b, h, w), generator=generator).to(device)
    return {"img": img, "seg": seg, "meta": [{}] * b}


def _build(env, config, overrides, device):
    from eglp_dist.config import load_config
    from eglp_dist.methods import build_method

    cfg = load_config(config, list(overrides))
    method = build_method(cfg, env, device)
    batches = [{s: scene_batch(getattr(cfg.data, s), cfg.data, STYLES.get(s, "day"), device,
                               seed=env.rank, start=k * 64, ground_truth=s in method.ground_truth_streams)
                for s in method.streams} for k in range(2)]
    return cfg, method, batches


def _step(method, batches, it: int) -> None:
    logs = method.step(batches[it % 2], it)
    float(sum(v.float() for v in logs.values()))  # wait for the step, as a log would


def _timed(fn, sync, spent):
    """``fn`` that also appends its seconds (device work included) to the list ``spent()``
    returns, or only runs it where that is None."""
    def timed(*args, **kwargs):
        into = spent()
        if into is None:
            return fn(*args, **kwargs)
        sync()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        sync()
        into.append(time.perf_counter() - t0)
        return out
    return timed


def _alone(fn):
    """``fn`` run as a one-rank job would run it: the runtime sees no process group, so the
    step issues no collective (its engines, built for a world of 1, are not wrapped)."""
    from eglp_dist.runtime import comm

    def run(*args):
        distributed = comm.is_distributed
        comm.is_distributed = lambda: False
        try:
            return fn(*args)
        finally:
            comm.is_distributed = distributed
    return run


def _work(env, config, variants, warmup, iters, count, weak_scaling=False):
    import dataclasses

    from eglp_dist.runtime import comm
    from eglp_dist.runtime.env import current_device

    device = current_device(env)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    load_start = B.load_average()
    rows, info, parts = {}, {}, {}
    alone = dataclasses.replace(env, world_size=1, local_world_size=1)
    builds = [(name, overrides, env) for name, overrides in variants]
    if weak_scaling:  # every row also as a one-rank job, in the same processes (see main)
        builds += [(f"{name}@1", overrides, alone) for name, overrides in variants]
    for name, overrides, build_env in builds:
        cfg, method, batches = _build(build_env, config, overrides, device)
        if build_env is alone and cfg.engine.kind != "ddp":
            raise SystemExit("bench_step --weak-scaling: one-rank rows need engine.kind=ddp (DeepSpeed "
                             f"always uses the whole process group), not {cfg.engine.kind}")

        def step(it, m=method, b=batches):
            _step(m, b, it)
        rows[name] = _alone(step) if build_env is alone else step
        parts[name] = {"ranking": [], "reduce": []}
        if getattr(method, "similarity", None) is not None:
            method.similarity = _timed(method.similarity, sync, lambda spent=parts[name]["ranking"]: spent)
        info[name] = {"params": sum(p.numel() for p in method.student.model.parameters()),
                      "model": cfg.model.name, "batch": cfg.data.source.batch_size,
                      "crop": list(cfg.data.source.crop_size)}
    # the wait for the statistics all-reduce, attributed to the row being stepped (only
    # EGLP's step has one; the log interval's reduction is outside the step)
    current = {"row": None}
    wait = comm.PendingSums.wait
    timed_wait = _timed(wait, sync, lambda: parts[current["row"]]["reduce"] if current["row"] else None)

    def row(name):
        def run(it):
            current["row"] = name
            rows[name](it)
            current["row"] = None
        return run

    def reset():  # the shares count the timed rounds only
        for p in parts.values():
            for spent in p.values():
                spent.clear()

    comm.PendingSums.wait = timed_wait
    try:
        times = B.interleave({n: row(n) for n in rows}, warmup, iters, sync, on_timed=reset, align=comm.barrier)
    finally:
        comm.PendingSums.wait = wait
    out = {"times": times, "info": info, "load": [load_start, B.load_average()],
           "shares": {n: {k: sum(v) / sum(times[n]["wall"]) if v else None for k, v in p.items()}
                      for n, p in parts.items()}}
    if count:
        out["collectives"] = count_collectives(env, config, variants)
    return out


def count_collectives(env, config, variants, steps: int = 2) -> dict:
    """Per row, the collectives of one iteration (mean of ``steps`` after one warm-up), rows
    built afresh (DDP takes a communication hook only before its first backward). A worker
    for ``run_ranks``; tests/test_collectives.py pins the counts."""
    from torch.nn.parallel import DistributedDataParallel

    from eglp_dist.runtime.env import current_device

    device = current_device(env)
    counter = B.CollectiveCounter().patch()
    out = {}
    try:
        for name, overrides in variants:
            _, method, batches = _build(env, config, overrides, device)
            for engine_name, engine in method.engines.items():
                if isinstance(getattr(engine, "wrapper", None), DistributedDataParallel):
                    counter.ddp_hook(engine.wrapper, engine_name)
            _step(method, batches, 0)
            counter.counts = {}
            with counter.counting():
                for it in range(1, steps + 1):
                    _step(method, batches, it)
            out[name] = counter.table(per=steps)
            del method, batches
    finally:
        counter.unpatch()
    return out


def _memory_work(env, config, overrides):
    from eglp_dist.runtime.env import current_device

    device = current_device(env)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, method, batches = _build(env, config, overrides, device)
    for it in range(2):
        _step(method, batches, it)
    return (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _print_times(per_rank, names, ref, iters, warmup, config, ranks):
    first = per_rank[0]["info"][ref]
    kind = "CUDA" if torch.cuda.is_available() else "CPU, gloo"
    print(f"{config}: model {per_rank[0]['info'][names[-1]]['model']}, batch {first['batch']}/rank, crop "
          f"{first['crop']}, {ranks} ranks ({kind}); rows interleaved, order rotating: {warmup} warm-up + {iters} "
          f"timed rounds")
    print(f"{'method':<12}{'rank':>5}{'wall s/iter [min-max]':>26}{'cpu s/iter':>12}"
          f"{'paired x ' + ref[:11]:>28}{'ranking':>9}{'reduce':>9}{'params':>12}")
    for rank, res in enumerate(per_rank):
        summary = B.summarise(res["times"], ref)
        for name in names:
            s, shares = summary[name], res["shares"][name]
            ranking = "" if shares["ranking"] is None else f"{100 * shares['ranking']:.1f}%"
            reduce = "" if shares["reduce"] is None else f"{100 * shares['reduce']:.2f}%"
            print(f"{name:<12}{rank:>5}{B.format_spread(s['wall']):>26}{s['cpu']['median']:>12.3f}"
                  f"{B.format_spread(s['ratio'], 2):>28}{ranking:>9}{reduce:>9}{res['info'][name]['params']:>12,}")
    print("load average (1 min) at start, end, per rank: "
          + "; ".join(f"{r['load'][0]}, {r['load'][1]}" for r in per_rank))


def _print_memory(memory, names, ref):
    mem = "peak alloc" if torch.cuda.is_available() else "peak RSS"
    print(f"{mem} per rank (each row in fresh processes, 2 steps):")
    for name in names:
        print(f"  {name:<12}" + "  ".join(f"{m / 2**20:8.0f} MiB x{m / memory[ref][r]:.2f}"
                                           for r, m in enumerate(memory[name])))


def _print_collectives(per_rank, names):
    print("collectives per iteration (rank 0; calls, bytes, asked for by):")
    for name in names:
        table = per_rank[0]["collectives"][name]
        total = sum(r["calls"] for r in table)
        print(f"  {name}: {total:g} collective(s), {sum(r['bytes'] for r in table) / 2**20:.2f} MiB")
        for r in table:
            print(f"    {r['calls']:g} x {r['collective']:<26}{r['dtype']:<10}{r['bytes'] / 1024:>12.1f} KiB  "
                  f"{r['purpose']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="uda", choices=list(SUITES))
    p.add_argument("--config", default=None, help="default: configs/demo/tiny_eglp.yaml (uda), tiny_spn.yaml (spn)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=16, help="timed rounds (each row once per round)")
    p.add_argument("--memory", action="store_true", help="each row's peak memory (fresh processes per row)")
    p.add_argument("--count-collectives", action="store_true")
    p.add_argument("--weak-scaling", action="store_true",
                   help="also run every row as a one-rank job in the same ranks and print the paired ratios")
    p.add_argument("--json", default=None, metavar="PATH", help="write the raw figures here")
    a = p.parse_args(argv)
    from eglp_dist.runtime.spawn import run_ranks

    default_config, variants = SUITES[a.suite]
    config = a.config or str(PACKAGE_CONFIG_ROOT / "demo" / f"{default_config}.yaml")
    variants = [(n, [*a.overrides, *extra]) for n, extra in variants]
    names, ref = [n for n, _ in variants], variants[0][0]
    per_rank = run_ranks(_work, a.ranks, args=(config, variants, a.warmup, a.iters, a.count_collectives,
                                               a.weak_scaling), backend="auto")
    _print_times(per_rank, names, ref, a.iters, a.warmup, config, a.ranks)
    if a.weak_scaling:
        print(f"weak scaling: {a.ranks}-rank step / the same row as a one-rank job (paired, per rank; same "
              f"per-rank batch, both running on every rank at once):")
        for name in names:
            ratios = [B.spread([x / y for x, y in zip(r["times"][name]["wall"], r["times"][f"{name}@1"]["wall"])])
                      for r in per_rank]
            print(f"  {name:<12}" + ", ".join(B.format_spread(x, 3) for x in ratios))
    last = names[-1]
    if a.suite == "uda":
        print("ranking: share of the step in the class-similarity ranking (PIG's fusion); reduce: share of the "
              "step waiting for EGLP's one statistics all-reduce (DNIS + RCM sums)")
        ratios = [B.paired_ratios(r["times"], "pig")["eglp"] for r in per_rank]
        print(f"EGLP / PIG step time (paired, per rank): {', '.join(B.format_spread(x, 2) for x in ratios)}")
    else:
        ratios = [B.paired_ratios(r["times"], ref)[last] for r in per_rank]
        print(f"{last} / {ref} step time (paired, per rank): {', '.join(B.format_spread(x, 2) for x in ratios)}")
    memory = None
    if a.memory:
        memory = {n: run_ranks(_memory_work, a.ranks, args=(config, o), backend="auto") for n, o in variants}
        _print_memory(memory, names, ref)
    if a.count_collectives:
        _print_collectives(per_rank, names)
    B.write_json(a.json, {"config": config, "ranks": a.ranks, "warmup": a.warmup, "iters": a.iters,
                          "per_rank": per_rank, "memory": memory})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
