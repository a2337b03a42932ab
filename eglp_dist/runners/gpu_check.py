"""The GPU path, proven and measured by one command, with only data it synthesises.

    python tools/gpu_check.py [--out runs/gpu_check] [--dry-run]      (also: make gpu-check)

On a machine with NVIDIA GPUs (meant to finish in under 5 minutes on one):

* **decode**: packed JPEG shards of Cityscapes-sized synthetic images through the training
  stream: DALI ``mixed`` (nvJPEG on the GPU) vs DALI ``cpu`` vs the PIL back-end, images/s
  (DALI skipped, with that reason, where it is not installed: a bare GPU host with the kit of
  ``tools/gpu_kit.py``); and JPEG decode alone: torchvision's nvJPEG
  (``decode_jpeg(device="cuda")``) vs PIL and torchvision on the CPU;
* **step**: one training iteration of the paper-size HRDA MiT-b5 (1024x1024 crops, random
  init, fake batches) for UDA, PIG and EGLP, in bf16, under DDP and ZeRO-2 over NCCL: s/iter,
  ``max_memory_allocated``, the autocast state seen *inside* each engine's wrapper (the
  forward of the model's first module), and the host syncs per iteration
  (``torch.cuda.set_sync_debug_mode``);
* **precision**: the UDA step in bf16 vs fp32 with TF32 matmuls vs fp32;
* **nccl2**: DDP and ZeRO-2 on 2 processes when the machine has 2 GPUs, and ZeRO-2's memory
  ratio to DDP (optimizer state and peak);
* **eval**: evaluation memory and time of one 1080x1920 image with HRDA's sliding windows,
  batched vs one window at a time;
* **train loop**: the real ``eglp train`` loop (tiny EGLP config, DALI on the GPU) for 4
  iterations with logging, evaluation and a checkpoint, then resumed for 4 more: what the
  step checks do not reach (the log reduction, the control point, the evaluation all-reduce,
  the checkpoint writer), on 1 rank and on 2 when there are 2 GPUs.

On a machine without a GPU (or with ``--dry-run``) it runs a tiny version of the same code
paths on the CPU (gloo, tiny models, CPU autocast for bf16) and lists exactly what it skipped.
It writes OUT/gpu_check.json and OUT/gpu_check.md (the table for docs/engine.md). Numbers
are what was measured; nothing is asserted except that every check ran.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch


from eglp_dist.config import PACKAGE_CONFIG_ROOT

PAPER = str(PACKAGE_CONFIG_ROOT / "eglp" / "city2acdc.yaml")  # HRDA MiT-b5, PIG's + EGLP's parts
TINY = str(PACKAGE_CONFIG_ROOT / "demo" / "tiny_eglp.yaml")
METHODS = {"uda": ["method.name=uda"], "pig": ["method.name=pig", "method.fusion.enabled=true"],
           "eglp": ["method.name=eglp"]}


def sizes(gpu: bool) -> dict:
    """Paper sizes on a GPU; the dry run's on a CPU."""
    if gpu:
        return {"config": PAPER, "overrides": ["model.pretrained=null"],  # its crops: 1024x1024, batch 2
                "warmup": 2, "iters": 3, "eval_hw": (1080, 1920), "decode_n": 24, "decode_size": (2048, 1024),
                "decode_crop": (1024, 1024), "decode_batches": 8}
    return {"config": TINY, "overrides": [], "warmup": 1, "iters": 1, "eval_hw": (108, 192), "decode_n": 4,
            "decode_size": (256, 128), "decode_crop": (64, 64), "decode_batches": 2}


# -- inside the worker processes -------------------------------------------------------------

class AutocastProbe:
    """What autocast looks like inside a wrapped forward: hooks on the model's direct
    children (called from within ``model.method``, so from within the wrapper)."""

    def __init__(self, model: torch.nn.Module, device_type: str):
        self.seen = set()
        self.device_type = device_type
        self.handles = [m.register_forward_pre_hook(self._hook) for m in model.children()]

    def _hook(self, module, args):
        if torch.is_grad_enabled():  # training forwards, not the EMA/ImageNet copies
            on = torch.is_autocast_enabled(self.device_type)
            self.seen.add(str(torch.get_autocast_dtype(self.device_type)).replace("torch.", "") if on else "off")

    def result(self) -> str:
        for h in self.handles:
            h.remove()
        return "/".join(sorted(self.seen)) or "no training forward"


def _synced_step(method, batch, it, device) -> int:
    """One iteration, counting the host syncs it makes (CUDA's sync debug mode warns once per
    synchronising call)."""
    if device.type != "cuda":
        method.step(batch, it)
        return -1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            method.step(batch, it)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def measure_step(env, config, overrides, warmup, iters) -> dict:
    """Build a method as `eglp train` does and time its iteration on fake batches."""
    from eglp_dist.runners.bench_step import fake_batch

    from eglp_dist.config import load_config
    from eglp_dist.runtime.env import current_device
    from eglp_dist.methods import build_method

    device = current_device(env)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    cfg = load_config(config, list(overrides))
    method = build_method(cfg, env, device)
    g = torch.Generator().manual_seed(env.rank)
    batches = [{s: fake_batch(getattr(cfg.data, s), cfg.model.num_classes, device, g) for s in method.streams}
               for _ in range(2)]
    probes = {name: AutocastProbe(e.model, device.type) for name, e in method.engines.items()}
    times, syncs = [], []
    for it in range(warmup + 1 + iters):  # warm-up, one sync-counted, then the timed ones
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        if it == warmup:  # one counted iteration (sync counting slows it: not timed)
            syncs.append(_synced_step(method, batches[it % 2], it, device))
            continue
        method.step(batches[it % 2], it)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if it > warmup:
            times.append(time.perf_counter() - t0)
    out = {"s_per_iter": statistics.median(times) if times else None,
           "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
           "autocast": {n: p.result() for n, p in probes.items()},
           "syncs_per_iter": syncs[0] if syncs and syncs[0] >= 0 else None,
           "optimizer_bytes": {n: sum(e.optimizer_state_bytes().values()) for n, e in method.engines.items()},
           "engine": cfg.engine.kind, "precision": cfg.engine.precision, "model": cfg.model.name,
           "crop": list(cfg.data.source.crop_size), "batch": cfg.data.source.batch_size,
           "world": env.world_size}
    del method, batches
    return out


def measure_eval(env, config, overrides, hw) -> list:
    """Evaluation memory of one image with sliding windows, batched or not."""
    from eglp_dist.config import load_config
    from eglp_dist.runtime.precision import autocast, autocast_dtype
    from eglp_dist.runtime.env import current_device
    from eglp_dist.models import build_segmentor

    device = current_device(env)
    rows = []
    for batched in (True, False):
        cfg = load_config(config, list(overrides) + [f"model.batched_slide={str(batched).lower()}"])
        model = build_segmentor(cfg.model).to(device).eval()
        img = torch.randn(1, 3, *hw, device=device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        with torch.no_grad(), autocast(device, autocast_dtype(cfg.engine.precision, device)):
            model(img)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            logits = model(img)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        rows.append({"batched_slide": batched, "seconds": time.perf_counter() - t0,
                     "peak_bytes_above_weights": (torch.cuda.max_memory_allocated(device) - base
                                                  if device.type == "cuda" else None),
                     "logits": list(logits.shape), "window": list(cfg.model.test_window or [])})
        del model, logits
    return rows


def single_gpu_worker(env, plan) -> dict:
    """Every one-process measurement in one process (one start-up for all)."""
    out = {"step": [], "precision": [], "eval": None}
    for section, name, engine, precision in plan["steps"]:  # section: "step" or "precision"
        row = measure_step(env, plan["config"], [*plan["overrides"], *METHODS[name], f"engine={engine}",
                                                 f"engine.precision={precision}"], plan["warmup"], plan["iters"])
        out[section].append(dict(row, method=name))
    out["eval"] = measure_eval(env, plan["config"], plan["overrides"], plan["eval_hw"])
    return out


def two_gpu_worker(env, plan) -> list:
    rows = []
    for engine in ("ddp", "zero2"):
        rows.append(dict(measure_step(env, plan["config"], [*plan["overrides"], *METHODS["uda"], f"engine={engine}",
                                                            "engine.precision=bf16"], plan["warmup"], plan["iters"]),
                         method="uda", rank=env.rank))
    return rows


def train_loop_worker(env, config, overrides, iters) -> dict:
    """The real `eglp train` loop on this device: logging (the log-interval reduction of every
    logged value, host counters included), evaluation, a checkpoint, then a resume to twice
    the iterations. What the step checks above do not touch (Monitor, control point, eval
    all-reduce, checkpoint writer, loaders on the device)."""
    from eglp_dist.config import load_config
    from eglp_dist.train import train

    t0 = time.perf_counter()
    first = train(load_config(config, [*overrides, f"trainer.max_iters={iters}"]))
    t1 = time.perf_counter()
    second = train(load_config(config, [*overrides, f"trainer.max_iters={2 * iters}"]))
    return {"first_s": t1 - t0, "resumed_s": time.perf_counter() - t1, "world": env.world_size,
            "mIoU": (second or {}).get("mIoU", (first or {}).get("mIoU")), "ok": True}


def measure_train_loop(out: Path, gpu: bool, n_ranks: int, skipped: list) -> list:
    from eglp_dist.demo import prepare_data
    from eglp_dist.runtime.spawn import run_ranks

    shards = prepare_data(out / "loop_data", n_train=8, n_val=4, size=(256, 128))
    config = str(PACKAGE_CONFIG_ROOT / "demo" / "tiny_eglp.yaml")
    rows = []
    for world in sorted({1, n_ranks}):
        overrides = [f"run.out_dir={out / f'loop_runs_{world}'}", f"data.source.shards={shards['cityscapes_train']}",
                     f"data.target.shards={shards['acdc_night_train']}", f"data.prompt.shards={shards['prompt_night']}",
                     f"data.val.acdc_night.shards={shards['acdc_night_val']}", "trainer.log_interval=2",
                     "trainer.eval_interval=4", "trainer.ckpt_interval=4", "trainer.image_interval=4",
                     *(["data.backend=dali"] if gpu else [])]
        row = run_ranks(train_loop_worker, world, args=(config, overrides, 4), backend="nccl" if gpu else "gloo")[0]
        rows.append(dict(row, backend="dali (mixed)" if gpu else "default"))
    return rows


# -- decode (this process) -------------------------------------------------------------------

def measure_decode(out: Path, gpu: bool, s: dict, skipped: list) -> list:
    from eglp_dist.runners import bench_loader

    from eglp_dist.data.config import DataConfig
    from eglp_dist.data.loader import build_train_stream

    work = out / "decode_data"
    args = argparse.Namespace(work=str(work), n=s["decode_n"], size=list(s["decode_size"]), threads=4)
    bench_loader.prepare(args)
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    variants = [("dali", "mixed"), ("dali", "cpu"), ("pil", None)]
    rows = []
    for backend, decode in variants:
        if decode == "mixed" and not gpu:
            skipped.append("decode: DALI 'mixed' (nvJPEG) needs a CUDA device")
            continue
        cfg = DataConfig(backend=backend, num_threads=4, prefetch=2, **({"decode_device": decode} if decode else {}))
        st = cfg.source
        st.shards, st.batch_size, st.crop_size = str(work / "shards"), 2, list(s["decode_crop"])
        st.img_scale, st.ratio_range = list(s["decode_size"]), [0.5, 2.0]
        if backend == "dali" and not dali_installed():
            skipped.append(f"decode: DALI {decode}: nvidia-dali is not installed (its wheel, ~600 MB installed, "
                           "cannot travel with the GPU kit); JPEG decode measured with torchvision instead")
            continue
        try:
            stream = build_train_stream(st, cfg, 0, 1, seed=0, device=device)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            skipped.append(f"decode: {backend}/{decode}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            continue
        next(stream)
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(s["decode_batches"]):
            batch = next(stream)
        if gpu:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        rows.append({"loader": f"{backend}" + (f" ({decode})" if decode else ""), "device": str(batch["img"].device),
                     "images_per_s": s["decode_batches"] * 2 / wall, "crop": list(s["decode_crop"]),
                     "source_size": list(s["decode_size"])})
        stream.close()
    return rows + measure_jpeg_decode(work / "shards", gpu, skipped)


def dali_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def measure_jpeg_decode(shards: Path, gpu: bool, skipped: list) -> list:
    """JPEG decode alone, the shards' images to RGB tensors: PIL and torchvision on the CPU,
    torchvision's nvJPEG (``decode_jpeg(device="cuda")``, one batched call) on the GPU. What
    DALI's ``mixed`` decode would use, measurable without DALI."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image
    from torchvision.io import decode_jpeg

    data = [t.extractfile(m).read() for path in sorted(shards.glob("*.tar")) for t in [tarfile.open(path)]
            for m in t.getmembers() if m.name.endswith(".jpg")]
    encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
    decoders = {"jpeg only: PIL (cpu)": lambda: [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in data],
                "jpeg only: torchvision (cpu)": lambda: [decode_jpeg(e) for e in encoded]}
    if gpu:
        decoders["jpeg only: torchvision nvJPEG (cuda)"] = lambda: decode_jpeg(encoded, device="cuda")
    else:
        skipped.append("decode: torchvision nvJPEG (decode_jpeg on cuda) needs a CUDA device")
    rows = []
    for name, decode in decoders.items():
        try:
            decode()  # warm-up (nvJPEG's handle, allocations)
        except RuntimeError as exc:  # e.g. torchvision without its image extension: reported, not fatal
            skipped.append(f"decode: {name}: {str(exc).splitlines()[0]}")
            continue
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = decode()
        if gpu:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        first = out[0]
        rows.append({"loader": name, "device": str(first.device) if hasattr(first, "device") else "cpu",
                     "images_per_s": len(data) / wall, "images": len(data),
                     "source_size": list(first.shape[-2:] if hasattr(first, "device") else first.shape[:2])})
    return rows


# -- report ----------------------------------------------------------------------------------

def _mib(b):
    return "-" if b is None else f"{b / 2 ** 20:,.0f}"


def markdown(report: dict) -> str:
    e = report["environment"]
    lines = [f"GPU check ({'dry run on CPU' if report['dry_run'] else 'GPU'}): {e['gpus'] or 'no GPU'}; "
             f"torch {e['torch']}, CUDA {e['cuda']}, DeepSpeed {e['deepspeed']}, DALI {e['dali']}", ""]
    if report["decode"]:
        lines += ["| loader | images/s | output on |", "|---|---:|---|"]
        lines += [f"| {r['loader']} | {r['images_per_s']:.1f} | {r['device']} |" for r in report["decode"]]
        lines.append("")
    if report.get("train_loop"):
        lines += ["| `eglp train` loop (tiny EGLP: log, eval, checkpoint, resume) | ranks | s (4 iters) | s (resumed, 4 more) | mIoU |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['backend']} | {r['world']} | {r['first_s']:.1f} | {r['resumed_s']:.1f} | "
                  f"{100 * (r['mIoU'] or 0):.2f} |" for r in report["train_loop"]]
        lines.append("")
    lines += ["| method | engine | precision | ranks | s/iter | peak MiB | optimizer MiB | autocast inside wrapper | host syncs/iter |",
              "|---|---|---|---:|---:|---:|---:|---|---:|"]
    for r in report["step"] + report["precision"] + report["nccl2"]:
        s_iter = "-" if r["s_per_iter"] is None else f"{r['s_per_iter']:.3f}"
        auto = ", ".join(f"{k}: {v}" for k, v in r["autocast"].items())
        syncs = "-" if r["syncs_per_iter"] is None else str(r["syncs_per_iter"])
        lines.append(f"| {r['method']} | {r['engine']} | {r['precision']} | {r['world']} | {s_iter} | "
                     f"{_mib(r['peak_bytes'])} | {_mib(sum(r['optimizer_bytes'].values()))} | {auto} | {syncs} |")
    if report.get("ratios"):
        lines += ["", "; ".join(f"{k}: {v:.2f}" for k, v in report["ratios"].items())]
    if report["eval"]:
        lines += ["", "| evaluation, one image | windows | seconds | peak MiB above weights |", "|---|---|---:|---:|"]
        for r in report["eval"]:
            lines.append(f"| {'x'.join(map(str, report['eval_hw']))} | {'batched' if r['batched_slide'] else 'one at a time'} "
                         f"| {r['seconds']:.3f} | {_mib(r['peak_bytes_above_weights'])} |")
    if report["skipped"]:
        lines += ["", "Skipped:"] + [f"- {s}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"


def environment() -> dict:
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": ", ".join(gpus), "n_gpus": len(gpus),
            "deepspeed": version("deepspeed"),
            "dali": next((f"{d.metadata['Name']} {d.version}" for d in md.distributions()
                          if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")), None),
            "python": platform.python_version()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_check")
    p.add_argument("--dry-run", action="store_true", help="the CPU version even where GPUs are")
    a = p.parse_args(argv)
    from eglp_dist.runtime.spawn import run_ranks

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available() and not a.dry_run
    n_gpus = torch.cuda.device_count() if gpu else 0
    s = sizes(gpu)
    skipped = [] if gpu else ["everything at paper size: no GPU (or --dry-run); tiny models on CPU, gloo"]
    t_start = time.perf_counter()
    report = {"dry_run": not gpu, "environment": environment(), "eval_hw": list(s["eval_hw"]), "skipped": skipped,
              "decode": [], "train_loop": [], "step": [], "precision": [], "nccl2": [], "eval": [], "ratios": {}}

    report["decode"] = measure_decode(out, gpu, s, skipped)
    report["train_loop"] = measure_train_loop(out, gpu, 2 if (not gpu or n_gpus >= 2) else 1, skipped)

    steps = [("step", m, e, "bf16") for m in METHODS for e in ("ddp", "zero2")]
    steps += [("precision", "uda", "ddp", p) for p in (["tf32", "fp32"] if gpu else ["fp32"])]
    if not gpu:
        skipped.append("precision: TF32 exists on CUDA (Ampere and later) only; fp32 vs bf16 (CPU autocast) shown")
    plan = {"config": s["config"], "overrides": s["overrides"], "warmup": s["warmup"], "iters": s["iters"],
            "eval_hw": s["eval_hw"], "steps": steps}
    backend = "nccl" if gpu else "gloo"
    single = run_ranks(single_gpu_worker, 1, args=(plan,), backend=backend)[0]
    report["step"], report["precision"], report["eval"] = single["step"], single["precision"], single["eval"]
    if not gpu:
        skipped.append("host syncs per iteration: counted with CUDA's sync debug mode, CUDA only")

    if gpu and n_gpus < 2:
        skipped.append(f"nccl2: 2 processes over NCCL need 2 GPUs, this machine has {n_gpus}")
    else:
        report["nccl2"] = run_ranks(two_gpu_worker, 2, args=(plan,), backend=backend)[0]
        ddp, zero = report["nccl2"]
        report["ratios"]["ZeRO-2 / DDP optimizer state per rank (2 ranks)"] = (
            sum(zero["optimizer_bytes"].values()) / sum(ddp["optimizer_bytes"].values()))
        if gpu:
            report["ratios"]["ZeRO-2 / DDP peak memory (2 ranks)"] = zero["peak_bytes"] / ddp["peak_bytes"]
    by = {(r["method"], r["engine"], r["precision"]): r for r in report["step"] + report["precision"]}
    for pr in ("tf32", "fp32"):
        if ("uda", "ddp", pr) in by and by[("uda", "ddp", "bf16")]["s_per_iter"]:
            report["ratios"][f"UDA step {pr} / bf16"] = by[("uda", "ddp", pr)]["s_per_iter"] / by[("uda", "ddp", "bf16")]["s_per_iter"]
    report["seconds"] = time.perf_counter() - t_start
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    (out / "gpu_check.md").write_text(table)
    print(table)
    print(f"{report['seconds']:.0f} s; wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
