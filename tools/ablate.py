#!/usr/bin/env python
"""The method ablations on synthetic data, 2 CPU ranks, several seeds: ``eglp`` (day -> night
UDA, the default) and ``spn`` (domain generalisation from a game-style source).

Each variant is trained with torchrun exactly as ``eglp train`` runs, evaluated, and the
results go to a markdown table.

* ``eglp``: the demo's data (synthetic Cityscapes day source, synthetic ACDC night target and
  validation, 6 labelled synthetic night prompts); night mIoU (mean and each seed), mean IoU
  of the rare classes, and of the low-DNIS classes (the ``--low-k`` classes of lowest DNIS
  at the end of the first seed's EGLP run).
* ``spn``: a synthetic "game"-style GTA5 source only; the same validation streets rendered in
  four unseen styles (day, night, fog, rain) are the targets; baseline (DeepLabV3+, one
  resolution, no prompts) vs SPN; the average over the unseen styles and each style.

Resumable: a run whose last evaluation is at the final iteration is not trained again (and
a run folder trained with other settings is refused by the run-folder check, so change
``--out`` when changing ``--iters``).

    python tools/ablate.py --out runs/ablation --iters 300 --seeds 0 1
    python tools/ablate.py spn --out runs/ablation_spn --iters 1500 --seeds 0 1
    eglp ablate spn --out runs/ablation_spn --iters 1500 --seeds 0 1
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# name -> (demo config, overrides): each ablation is one override of the full method
VARIANTS = {
    "source-only": ("tiny_source_only", []),
    "UDA (HRDA)": ("tiny_uda", []),
    "PIG-style": ("tiny_pig", []),
    "EGLP": ("tiny_eglp", []),
    "EGLP w/o RCM": ("tiny_eglp", ["method.eglp.rcm.enabled=false"]),
    "EGLP w/o DNIS+DMS (PIG top-k)": ("tiny_eglp", ["method.eglp.dnis.enabled=false", "method.eglp.dms.enabled=false",
                                                      "method.eglp.fis.enabled=false", "method.fusion.enabled=true"]),
    "EGLP w/o NFNet": ("tiny_eglp", ["method.nfnet.enabled=false", "method.fusion.enabled=false"]),
}
SPN_VARIANTS = {
    "baseline (DeepLabV3+)": ("tiny_spn_baseline", []),
    "SPN": ("tiny_spn", []),
}
# the DG targets: tiny_spn.yaml's data.val names -> shard folders of demo.prepare_dg_data
SPN_TARGETS = {"day": "cityscapes_val", "night": "acdc_night_val", "fog": "foggy_cityscapes_val",
               "rain": "rain_cityscapes_val"}


def eglp_data_args(shards) -> List[str]:
    return [f"data.source.shards={shards['cityscapes_train']}", f"data.target.shards={shards['acdc_night_train']}",
            f"data.val.acdc_night.shards={shards['acdc_night_val']}", f"data.prompt.shards={shards['prompt_night']}"]


def spn_data_args(shards) -> List[str]:
    return [f"data.source.shards={shards['gta5_train']}"] + [
        f"data.val.{name}.shards={shards[folder]}" for name, folder in SPN_TARGETS.items()]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def done(run_dir: Path, iters: int) -> bool:
    f = run_dir / "eval.jsonl"
    return f.is_file() and any(json.loads(l).get("iter") == iters for l in f.read_text().splitlines() if l)


def train_variant(variant, name: str, seed: int, iters: int, out: Path, data_args: List[str], env) -> dict:
    """Train one (variant, seed) unless done before; its last evaluation record."""
    from eglp_dist.config import PACKAGE_CONFIG_ROOT
    from eglp_dist.demo import last_eval, train_command

    config, extra = variant
    run_name = f"{slug(name)}_s{seed}"
    run_dir = out / "runs" / run_name
    if not done(run_dir, iters):
        args = [f"run.out_dir={out / 'runs'}", f"run.name={run_name}", f"run.seed={seed}", *data_args,
                f"trainer.max_iters={iters}", f"trainer.eval_interval={iters}", f"trainer.ckpt_interval={iters}",
                f"trainer.log_interval={max(iters // 5, 1)}", *extra]
        t0 = time.perf_counter()
        log = run_dir.parent / f"{run_name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            code = subprocess.call(train_command(PACKAGE_CONFIG_ROOT / "demo" / f"{config}.yaml", args),
                                   env=env, stdout=f, stderr=subprocess.STDOUT)
        if code != 0:
            raise SystemExit(f"ablate: {run_name} failed (exit {code}); see {log}")
        print(f"  {run_name}: {time.perf_counter() - t0:.0f} s", flush=True)
    else:
        print(f"  {run_name}: done before, not retrained", flush=True)
    return last_eval(run_dir)


def final_dnis(run_dir: Path) -> Dict[str, float]:
    import torch

    from eglp_dist.data.labels import CLASSES
    from eglp_dist.dist.checkpoint import find_latest
    from eglp_dist.eglp.dnis import DNIS

    state = torch.load(find_latest(run_dir / "checkpoints") / "modules.pt", weights_only=False)["dnis"]
    d = DNIS(len(CLASSES), [0, 0, 0], [1, 1, 1])
    d.load_state_dict(state)
    v, seen = d.value(), d.seen()
    return {CLASSES[c]: float(v[c]) for c in range(len(CLASSES)) if bool(seen[c])}


def mean_iou(result: dict, classes: List[str]) -> float:
    iou = result["IoU"]
    vals = [iou[c] for c in classes if iou.get(c) is not None]
    return float(np.mean(vals)) if vals else float("nan")


def table(results: Dict[str, List[dict]], seeds, rare: List[str], low: List[str], iters: int) -> str:
    head = ["variant", "night mIoU (mean)"] + [f"seed {s}" for s in seeds] + ["rare classes IoU", "low-DNIS classes IoU"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in results.items():
        m = [100 * r["mIoU"] for r in res]
        rows.append("| " + " | ".join([name, f"{np.mean(m):.2f}"] + [f"{x:.2f}" for x in m]
                                      + [f"{100 * np.mean([mean_iou(r, rare) for r in res]):.2f}",
                                         f"{100 * np.mean([mean_iou(r, low) for r in res]):.2f}"]) + " |")
    notes = (f"\n{iters} iterations, 2 CPU ranks (gloo), tiny HRDA (MiT-b0), batch 2+2(+2 prompts) per rank, "
             f"synthetic night validation (24 images).\nRare classes: {', '.join(rare)} "
             f"(IoU averaged over those present in validation). Low-DNIS classes (lowest DNIS at the end of "
             f"EGLP seed {seeds[0]}): {', '.join(low)}.\n")
    return "\n".join(rows) + notes


def spn_table(results: Dict[str, List[dict]], seeds, iters: int) -> str:
    """Average over the unseen styles (mean over seeds and each seed), then each style."""
    head = ["variant", "unseen-style average mIoU"] + [f"seed {s}" for s in seeds] + list(SPN_TARGETS)
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in results.items():
        avg = [100 * r["mIoU"] for r in res]
        per = [f"{100 * np.mean([r['targets'][t]['mIoU'] for r in res]):.2f}" for t in SPN_TARGETS]
        rows.append("| " + " | ".join([name, f"{np.mean(avg):.2f}"] + [f"{x:.2f}" for x in avg] + per) + " |")
    notes = (f"\n{iters} iterations, 2 CPU ranks (gloo), tiny DeepLabV3+ (ResNet-18 [1,1,1,1], random init), "
             f"SGD lr 0.01 poly 0.9, batch 4 per rank, class-uniform sampling 0.5, RobustNet's jitter and blur; "
             f"source: synthetic GTA5 (game style, 96 images); targets: the same 24 validation streets rendered "
             f"day / night / fog / rain (full strength).\n")
    return "\n".join(rows) + notes


def run_eglp(a, out: Path, env) -> str:
    from eglp_dist.data.labels import CLASSES
    from eglp_dist.demo import prepare_data
    from eglp_dist.methods.config import EGLP_RARE

    data_args = eglp_data_args(prepare_data(out / "data"))
    names = a.only or list(VARIANTS)
    results: Dict[str, List[dict]] = {}
    for name in names:
        print(f"== {name}", flush=True)
        results[name] = [train_variant(VARIANTS[name], name, s, a.iters, out, data_args, env)["targets"]["acdc_night"]
                         for s in a.seeds]
    rare = [CLASSES[c] for c in EGLP_RARE]
    low: List[str] = []
    if "EGLP" in names:
        dnis = final_dnis(out / "runs" / f"{slug('EGLP')}_s{a.seeds[0]}")
        low = sorted(dnis, key=dnis.get)[: a.low_k]
    return table(results, a.seeds, rare, low, a.iters)


def run_spn(a, out: Path, env) -> str:
    from eglp_dist.demo import prepare_dg_data

    data_args = spn_data_args(prepare_dg_data(out / "data"))
    results = {}
    for name in a.only or list(SPN_VARIANTS):
        print(f"== {name}", flush=True)
        results[name] = [train_variant(SPN_VARIANTS[name], name, s, a.iters, out, data_args, env) for s in a.seeds]
    return spn_table(results, a.seeds, a.iters)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", nargs="?", default="eglp", choices=["eglp", "spn"])
    p.add_argument("--out", default=None, help="default: runs/ablation (eglp), runs/ablation_spn (spn)")
    p.add_argument("--iters", type=int, default=None, help="default: 300 (eglp), 1500 (spn)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--low-k", type=int, default=4)
    p.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    a = p.parse_args(argv)
    if (ROOT / "eglp_dist").is_dir():  # run from a checkout, uninstalled
        sys.path.insert(0, str(ROOT))
    a.iters = a.iters or {"eglp": 300, "spn": 1500}[a.study]
    out = Path(a.out or {"eglp": "runs/ablation", "spn": "runs/ablation_spn"}[a.study])
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    text = (run_eglp if a.study == "eglp" else run_spn)(a, out, env)
    (out / "ablation.md").write_text(text)
    print("\n" + text)
    print(f"total {time.perf_counter() - t0:.0f} s; table in {out / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
