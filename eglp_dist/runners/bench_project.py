"""Paper-size cost per iteration, projected: FLOPs of every network pass of a UDA, PIG and
EGLP step at the paper's settings, the bytes of every collective under DDP and ZeRO-2, and
from them seconds per iteration and hours for 40k iterations on N GPUs at stated
utilisations and bandwidth. A projection, not a measurement: its assumptions are printed.

    python tools/bench_project.py                    # = eglp bench project
    python tools/bench_project.py --ranks 8 --utilisation 0.35 0.5 --bus-gbps 350 --json runs/bench/project.json

How the passes are found (nothing is hand-listed): each recipe's real step runs once on this
machine, at the paper config's crops, batches and HRDA geometry but with a small encoder
(so it fits a CPU), and every outermost network call (``forward_train``, ``predict``,
``encode``) is recorded with its network, input shape and whether gradients flow. Each call
is then counted at full size: the paper network (MiT-b5 + DAFormer head + HRDA attention)
built on the ``meta`` device, the same call on inputs of the recorded shape, under
``torch.utils.flop_counter.FlopCounterMode`` (forward). Backward = 2x forward for calls whose
network is trained (gradient of the input and of the weights, each a forward's cost);
torch's own backward count is not used: it ignores ``groups`` in the weight gradient of a
convolution, so MiT's depthwise 3x3 convolutions would count ~20x their cost. Element-wise
work (losses, ClassMix, DNIS sums, RCM) is not counted; PIG's LPIPS similarity is replaced by
the ``stats`` one (no AlexNet weights here; LPIPS runs AlexNet once per class present, so PIG
is undercounted by about that).

Communication per iteration: per trained engine, DDP all-reduces fp32 gradients (ring:
2 (N-1)/N x 4 bytes/parameter sent per rank); ZeRO-2 with bf16 reduce-scatters bf16
gradients and all-gathers the updated bf16 parameters ((N-1)/N x 2 bytes/parameter each);
EGLP adds its statistics all-reduce (3 KB). Time = bytes / bus bandwidth, shown without
overlap (upper bound); DDP overlaps most of it with the backward.
"""
from __future__ import annotations

import argparse

import torch

from eglp_dist.config import PACKAGE_CONFIG_ROOT

CONFIGS = {"uda": "uda/hrda_cs2acdc_night.yaml", "pig": "eglp/city2acdc_pig.yaml", "eglp": "eglp/city2acdc.yaml"}
# a small encoder for the recording run: the paper's crops and HRDA geometry, a CPU's cost
SMALL_MODEL = ["model.encoder=mit_b0", "model.head.embed_dim=32", "model.head.channels=32",
               "model.hrda.attention_embed_dim=16"]
RUN = ["model.pretrained=null", "trainer.max_iters=40000"]
NO_LPIPS = ["method.fusion.similarity=stats"]  # PIG's and EGLP's configs: no AlexNet weights here
CALLS = ("forward_train", "predict", "encode")
H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H200 SXM datasheet, bf16 Tensor Core, dense
HRDA_PUBLISHED_HOURS = 32.0  # HRDA's training time on one GPU, as the issue quotes it


def record_calls(method, batches, it: int = 1) -> list:
    """One real step; every outermost network call as (network, call, input shape, trained)."""
    from torch import nn

    from eglp_dist.models.hrda import HRDASegmentor
    from eglp_dist.models.segmentor import Segmentor

    names = {id(e.model): n for n, e in method.engines.items()}
    names.update({id(p.module): n for n, p in method.modules.items() if isinstance(getattr(p, "module", None), nn.Module)})
    if getattr(method, "imnet", None) is not None:
        names[id(method.imnet)] = "imnet"
    log, depth, saved = [], [0], []

    def wrap(cls, name):
        fn = cls.__dict__[name]

        def recorded(self, images, *args, **kwargs):
            if depth[0] == 0:
                trained = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
                log.append((names.get(id(self), type(self).__name__), name, tuple(images.shape), trained))
            depth[0] += 1
            try:
                return fn(self, images, *args, **kwargs)
            finally:
                depth[0] -= 1
        saved.append((cls, name, fn))
        setattr(cls, name, recorded)

    for cls in (Segmentor, HRDASegmentor):
        for name in CALLS:
            if name in cls.__dict__:
                wrap(cls, name)
    try:
        logs = method.step(batches, it)
        float(sum(v.float() for v in logs.values()))
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)
    return log


def forward_flops(model_cfg, call: str, shape) -> int:
    """FLOPs of ``call`` on a full-size network built on the meta device (no memory, no time)."""
    from torch.utils.flop_counter import FlopCounterMode

    from eglp_dist.models import build_segmentor

    with torch.device("meta"):
        model = build_segmentor(model_cfg)
    x = torch.empty(shape, device="meta")
    kwargs = {"generator": torch.Generator().manual_seed(0)} if call == "forward_train" else {}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        getattr(model, call)(x, **kwargs)
    return counter.get_total_flops()


def project_method(env, name: str, device) -> dict:
    """The passes of ``name``'s step and their full-size FLOPs, and its trained engines' sizes."""
    from eglp_dist.runners import bench_step

    from eglp_dist.config import load_config
    from eglp_dist.methods import build_method
    from eglp_dist.methods.pig import derived_node

    config = str(PACKAGE_CONFIG_ROOT / CONFIGS[name])
    run = RUN + (NO_LPIPS if name != "uda" else [])
    small = load_config(config, [*run, *SMALL_MODEL])
    method = build_method(small, env, device)
    batches = {s: bench_step.scene_batch(getattr(small.data, s), small.data, bench_step.STYLES.get(s, "day"),
                                         device, seed=0, start=0, ground_truth=s in method.ground_truth_streams)
               for s in method.streams}
    calls = record_calls(method, batches)
    full = load_config(config, run)
    models = {"nfnet": derived_node(full.model, full.method.nfnet.model, "method.nfnet.model"),
              "nfnet_teacher": derived_node(full.model, full.method.nfnet.model, "method.nfnet.model")}
    cache, passes = {}, []
    for network, call, shape, trained in calls:
        model_cfg = models.get(network, full.model)
        key = (network in models, call, shape)
        if key not in cache:
            cache[key] = forward_flops(model_cfg, call, shape)
        passes.append({"network": network, "call": call, "input": list(shape), "trained": trained,
                       "forward_flops": cache[key], "backward_flops": 2 * cache[key] if trained else 0})
    with torch.device("meta"):
        from eglp_dist.models import build_segmentor

        params = {n: sum(p.numel() for p in build_segmentor(models.get(n, full.model)).parameters())
                  for n in method.engines}
    stats_bytes = 0
    if name == "eglp":  # DNIS (2 x K x 9) + RCM confidences (2 x K), float64
        k = full.model.num_classes
        stats_bytes = (2 * k * 9 + 2 * k) * 8
    return {"config": CONFIGS[name], "crop": list(full.data.source.crop_size),
            "batch": full.data.source.batch_size, "model": full.model.name, "passes": passes,
            "trained_params": params, "stats_bytes": stats_bytes, "precision": full.engine.precision}


def _work(env, names):
    from eglp_dist.runtime.env import current_device

    device = current_device(env)
    return {n: project_method(env, n, device) for n in names}


def communication(result: dict, ranks: int) -> dict:
    """Bytes each rank sends per iteration under DDP and ZeRO-2 (ring collectives)."""
    n = ranks
    params = sum(result["trained_params"].values())
    ddp = 2 * (n - 1) / n * 4 * params
    zero2 = 2 * (n - 1) / n * 2 * params  # reduce-scatter bf16 grads + all-gather bf16 params
    stats = 2 * (n - 1) / n * result["stats_bytes"]
    return {"ddp": ddp + stats, "zero2": zero2 + stats}


def report(results: dict, a) -> list:
    lines = [f"Projection (not a measurement) for {a.ranks} GPUs at {H200_BF16_DENSE_TFLOPS:g} TFLOPS bf16 dense "
             f"peak (H200), utilisation {', '.join(f'{u:.0%}' for u in a.utilisation)}, bus bandwidth "
             f"{a.bus_gbps:g} GB/s per rank, no compute/communication overlap, {a.iters} iterations; per GPU "
             "the paper's per-GPU batch (the global batch grows with GPUs, as in a data-parallel run)"]
    for name, r in results.items():
        passes = r["passes"]
        fwd = sum(p["forward_flops"] for p in passes)
        bwd = sum(p["backward_flops"] for p in passes)
        total = fwd + bwd
        lines.append(f"\n{name} ({r['config']}: {r['model']}, crop {r['crop']}, batch {r['batch']} per stream and "
                     f"GPU): {total / 1e12:.2f} TFLOP per iteration and GPU ({fwd / 1e12:.2f} forward, "
                     f"{bwd / 1e12:.2f} backward)")
        groups = {}
        for p in passes:
            key = (p["network"], p["call"], tuple(p["input"]), p["trained"])
            groups.setdefault(key, [0, p["forward_flops"], p["backward_flops"]])[0] += 1
        for (net, call, shape, trained), (count, f, b) in groups.items():
            lines.append(f"  {count} x {net:<14}{call:<14}{str(list(shape)):<22}{'trained' if trained else 'no grad':<9}"
                         f"{count * (f + b) / 1e12:8.2f} TFLOP")
        comm = communication(r, a.ranks)
        for kind in ("ddp", "zero2"):
            t_comm = comm[kind] / (a.bus_gbps * 1e9)
            cols = []
            for u in a.utilisation:
                t = total / (H200_BF16_DENSE_TFLOPS * 1e12 * u) + t_comm
                cols.append(f"{u:.0%}: {t:.3f} s/iter, {t * a.iters / 3600:.2f} h")
            lines.append(f"  {kind:<6} {comm[kind] / 2**20:8.1f} MiB sent per rank and iteration "
                         f"({t_comm * 1e3:.1f} ms); " + "; ".join(cols))
    if "uda" in results:
        uda = sum(p["forward_flops"] + p["backward_flops"] for p in results["uda"]["passes"])
        lines.append(f"\nbeside: HRDA's published training, {HRDA_PUBLISHED_HOURS:g} h for 40k iterations on one GPU: "
                     f"with the UDA step above, {uda * 40000 / (HRDA_PUBLISHED_HOURS * 3600) / 1e12:.1f} TFLOPS "
                     "sustained on that GPU")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--ranks", type=int, default=8, help="GPUs of the projection")
    p.add_argument("--utilisation", type=float, nargs="+", default=[0.35, 0.5], help="of bf16 dense peak")
    p.add_argument("--bus-gbps", type=float, default=350.0, help="collective bus bandwidth per rank, GB/s")
    p.add_argument("--iters", type=int, default=40000)
    p.add_argument("--json", default=None, metavar="PATH")
    a = p.parse_args(argv)
    from eglp_dist.runtime.spawn import run_ranks

    results = run_ranks(_work, 1, args=(a.methods,))[0]  # one process: the recording step needs a process group
    print("\n".join(report(results, a)))
    from eglp_dist.benchmarking import write_json

    write_json(a.json, {"args": vars(a), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
