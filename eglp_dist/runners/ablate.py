"""The method studies on synthetic data, 2 CPU ranks, several seeds: ``eglp`` (day -> night
UDA, the default) and ``spn`` (domain generalisation from a game-style source).

Warm-started (``--pretrain ITERS``, see ``eglp_dist/study.py`` for why): stage 0 is a
source-only run on the synthetic day source, trained once per study and cached by its
settings; every variant starts from it (``--init whole``: the whole source-only model;
``--init encoder``: its encoder only, the analogue of an ImageNet checkpoint) with the
recipe ``study.WARM_RECIPE`` (lr 6e-5, heads x10, no feature distance) plus ``--set``.
``--pretrain 0`` trains every variant from random weights as before.

Every (variant, seed) run is cached by its settings: a study stopped half-way continues
where it stopped (finished runs reused, an interrupted one resumed from its checkpoint).
The exact commands go to ``OUT/commands.sh``; the table to ``OUT/ablation.md`` and the raw
figures to ``OUT/results.json``.

* ``eglp``: night mIoU (mean, each seed), IoU of the classes the synthetic night changes most
  (fixed in advance from ``synth_render.night_change()``, ``study.classes_to_gain``) and of
  the rare classes, the pseudo-label weight over the second half of training, and the
  pseudo-label IoU of every source against the target's ground truth; paired per-seed
  differences (EGLP - PIG, EGLP - UDA, each part's removal).
* ``spn``: a synthetic "game"-style GTA5 source only; the same validation streets rendered in
  four unseen styles (day, night, fog, rain) are the targets; baseline vs SPN.

    python tools/ablate.py --out runs/study --pretrain 3000 --iters 400 --seeds 0 1 2
    python tools/ablate.py spn --out runs/study_spn --pretrain 1500 --iters 1500 --seeds 0 1 2
    eglp ablate --out runs/study --pretrain 3000 --only EGLP PIG-style --seeds 0
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[2]  # the source tree (an editable install): its commit is recorded

# name -> (demo config, overrides): each ablation is one override of the full method
VARIANTS = {
    "source-only": ("tiny_source_only", []),
    "UDA (HRDA)": ("tiny_uda", []),
    "PIG-style": ("tiny_pig", []),
    "EGLP": ("tiny_eglp", []),
    "EGLP w/o RCM": ("tiny_eglp", ["method.eglp.rcm.enabled=false"]),
    "EGLP w/o RCM paste (thresholds kept)": ("tiny_eglp", ["method.eglp.rcm.paste_per_image=0"]),
    "EGLP w/o RCM thresholds (paste kept)": ("tiny_eglp", ["method.eglp.rcm.class_thresholds=false"]),
    "EGLP w/o DMS (FIS only)": ("tiny_eglp", ["method.eglp.dms.enabled=false"]),
    "EGLP w/o FIS (DMS only)": ("tiny_eglp", ["method.eglp.fis.enabled=false"]),
    "EGLP w/o NFNet (prompt paste kept)": ("tiny_eglp", ["method.nfnet.enabled=false", "method.eglp.fis.enabled=false"]),
    "EGLP w/o prompt paste": ("tiny_eglp", ["method.eglp.dms.prompt_rate=0"]),
    "EGLP w/o DNIS (PIG top-k fusion)": ("tiny_eglp", ["method.eglp.dnis.enabled=false", "method.eglp.dms.enabled=false",
                                                         "method.eglp.fis.enabled=false", "method.fusion.enabled=true"]),
}
DEFAULT_ROWS = [n for n in VARIANTS if "w/o DNIS" not in n]
# (a, b): paired per-seed differences a - b
COMPARISONS = [("EGLP", "PIG-style"), ("EGLP", "UDA (HRDA)"), ("PIG-style", "UDA (HRDA)"),
               ("UDA (HRDA)", "source-only")] + [("EGLP", n) for n in VARIANTS if n.startswith("EGLP w/o")]
SOURCES = ("teacher", "nfnet", "dms", "fused", "final")

SPN_VARIANTS = {
    "baseline (DeepLabV3+)": ("tiny_spn_baseline", []),
    "SPN": ("tiny_spn", []),
}
# the DG targets: tiny_spn.yaml's data.val names -> shard folders of demo.prepare_dg_data
SPN_TARGETS = {"day": "cityscapes_val", "night": "acdc_night_val", "fog": "foggy_cityscapes_val",
               "rain": "rain_cityscapes_val"}


def spn_data_args(shards) -> List[str]:
    return [f"data.source.shards={shards['gta5_train']}"] + [
        f"data.val.{name}.shards={shards[folder]}" for name, folder in SPN_TARGETS.items()]


# ----------------------------------------------------------------------------- one run

def measure(run_dir: Path, iters: int) -> dict:
    """What the tables need from one finished run."""
    from eglp_dist import study

    ev = study.last_eval(run_dir)
    log = study.train_log(run_dir)
    changed, rare = study.classes_to_gain(), study.rare_classes()
    out = {"run": str(run_dir), "eval": ev, "pseudo_confidence": study.second_half_mean(log, "pseudo.confidence", iters),
           "pseudo_mean_weight": study.second_half_mean(log, "pseudo.mean_weight", iters), "pseudo": {}}
    night = ev.get("targets", {}).get("acdc_night")
    if night is not None:
        out.update(mIoU=100 * night["mIoU"], changed=100 * study.mean_iou_of(night["IoU"], changed),
                   rare=100 * study.mean_iou_of(night["IoU"], rare))
    for src in SOURCES:
        if any(f"pseudo_iou/{src}/mIoU" in r for r in log):
            out["pseudo"][src] = {g: 100 * study.pseudo_iou_of(log, src, cls, iters)
                                  for g, cls in (("mIoU", None), ("changed", changed), ("rare", rare))}
            out["pseudo"][src]["weighted_mIoU"] = 100 * study.pseudo_iou_of(log, src, None, iters, weighted=True)
    return out


# stage 0 of each study: the source-only recipe of its model. EGLP's variants start from its
# whole model with the recipe of a pretrained network (study.WARM_RECIPE); SPN's from its
# encoder (the SPN network has two input resolutions and prompts, so the baseline's whole model
# does not fit it), with RobustNet's SGD recipe unchanged: it is already the one for an
# ImageNet-pretrained encoder.
STAGE0 = {"eglp": "tiny_source_only", "spn": "tiny_spn_baseline"}
DEFAULT_INIT = {"eglp": "whole", "spn": "encoder"}


def stage0(a, root: Path, data_args: List[str]) -> Path:
    from eglp_dist import study

    spec = study.RunSpec("stage0 source-only", STAGE0[a.study], tuple(data_args), seed=a.pretrain_seed,
                         iters=a.pretrain)
    if a.report_only:
        return root / "runs" / spec.folder_name(root)
    print(f"== stage 0: source-only, {a.pretrain} iterations (seed {a.pretrain_seed})", flush=True)
    return study.run_cached(spec, root)


def common_args(a, root: Path, data_args: List[str]) -> List[str]:
    from eglp_dist import study

    args = list(data_args)
    if a.pretrain > 0:
        args += study.warm_start_args(stage0(a, root, data_args), a.init)
        args += list(study.WARM_RECIPE) if a.study == "eglp" else []
    return args + list(a.set)


def run_all(a, root: Path, variants: Dict[str, tuple], names: List[str], common: List[str]) -> Dict[str, Dict[int, dict]]:
    """Seeds outer, variants inner: an interrupted study has whole seeds to pair first.
    ``--report-only``: no training, the finished runs only."""
    from eglp_dist import study

    results: Dict[str, Dict[int, dict]] = {n: {} for n in names}
    for seed in a.seeds:
        for name in names:
            config, extra = variants[name]
            spec = study.RunSpec(name, config, tuple(common + list(extra)), seed=seed, iters=a.iters)
            if a.report_only:
                run_dir = root / "runs" / spec.folder_name(root)
                if study.finished(run_dir, a.iters):
                    results[name][seed] = measure(run_dir, a.iters)
                continue
            print(f"== {name}, seed {seed}", flush=True)
            results[name][seed] = measure(study.run_cached(spec, root), a.iters)
            (root / "results.json").write_text(json.dumps(results, indent=1))
    return results


# ----------------------------------------------------------------------------- tables

def eglp_tables(results: Dict[str, Dict[int, dict]], seeds: List[int]) -> str:
    from eglp_dist.study import classes_to_gain, fmt, paired, rare_classes

    def col(name, key):
        return [results[name][s].get(key, float("nan")) for s in seeds]

    head = (["variant", "night mIoU (mean)"] + [f"seed {s}" for s in seeds]
            + ["night-changed classes IoU", "rare classes IoU", "pseudo weight (2nd half): mean [lowest run]",
               "final pseudo-label mIoU"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in results:
        m = col(name, "mIoU")
        final = [results[name][s]["pseudo"].get("final", {}).get("mIoU", float("nan")) for s in seeds]
        rows.append("| " + " | ".join([name, fmt(np.mean(m))] + [fmt(x) for x in m]
                                      + [fmt(np.mean(col(name, "changed"))), fmt(np.mean(col(name, "rare"))),
                                         weight_cell(col(name, "pseudo_confidence")),
                                         fmt(np.mean(final))]) + " |")
    out = ["\n".join(rows), ""]
    # pseudo-label quality per source
    prow = ["| variant | source | pseudo-label mIoU | weighted mIoU | night-changed classes | rare classes |", "|---|---|---|---|---|---|"]
    for name in results:
        for src in SOURCES:
            vals = [results[name][s]["pseudo"].get(src) for s in seeds]
            if not vals or any(v is None for v in vals):
                continue
            prow.append("| " + " | ".join([name, src] + [fmt(np.mean([v[g] for v in vals]))
                                                         for g in ("mIoU", "weighted_mIoU", "changed", "rare")]) + " |")
    out += ["Pseudo-label IoU against the target's ground truth (mean over seeds of the second-half mean; "
            "`final` is the label the student is trained on, whose prompt and rare-class pastes are ground truth):", "",
            "\n".join(prow), ""]
    # paired differences
    drow = ["| a - b | metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | a > b in |",
            "|---|---|" + "---|" * (len(seeds) + 2)]
    for a_, b_ in COMPARISONS:
        if a_ not in results or b_ not in results:
            continue
        for key, label in (("mIoU", "night mIoU"), ("changed", "changed-classes IoU"), ("rare", "rare-classes IoU")):
            p = paired(col(a_, key), col(b_, key))
            drow.append(f"| {a_} - {b_} | {label} | " + " | ".join(f"{d:+.2f}" for d in p["diffs"])
                        + f" | {p['mean']:+.2f} | {p['positive']}/{p['n']} |")
    out += ["Paired per-seed differences (same seed, same data, same stage 0):", "", "\n".join(drow), ""]
    out.append(f"Night-changed classes (designed change >= 0.35, fixed in advance): {', '.join(classes_to_gain())}. "
               f"Rare classes (RCM's): {', '.join(rare_classes())}.")
    return "\n".join(out)


def weight_cell(values: List[float]) -> str:
    """The pseudo weight's mean over seeds and its lowest run (the >= 0.5 requirement is per run)."""
    from eglp_dist.study import fmt

    vals = [v for v in values if v == v]
    return f"{fmt(float(np.mean(vals)), 3)} [{fmt(min(vals), 3)}]" if vals else "n/a"


def eglp_chart(results: Dict[str, Dict[int, dict]], seeds: List[int], path: Path) -> None:
    """Per-class night IoU (mean over seeds) of the main rows, classes by designed night change."""
    from eglp_dist.charts import class_iou_chart
    from eglp_dist.data.labels import CLASSES
    from eglp_dist.data.offline.synth_render import night_change

    change = night_change()
    order = sorted(range(len(CLASSES)), key=lambda c: -change[c])
    rows = [n for n in ("source-only", "UDA (HRDA)", "PIG-style", "EGLP") if n in results]
    ious = {}
    for n in rows:
        per = [results[n][s]["eval"]["targets"]["acdc_night"]["IoU"] for s in seeds]
        ious[n] = {c: (float(np.mean([p[c] for p in per])) if all(p.get(c) is not None for p in per) else None)
                   for c in CLASSES}
    class_iou_chart(ious, [CLASSES[c] for c in order], path,
                    f"night IoU per class, mean of seeds {seeds}; under each class its designed night change",
                    [float(change[c]) for c in order])


def spn_tables(results: Dict[str, Dict[int, dict]], seeds: List[int]) -> str:
    from eglp_dist.study import fmt, paired

    head = ["variant", "unseen-style average mIoU"] + [f"seed {s}" for s in seeds] + list(SPN_TARGETS)
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    avg = {}
    for name, res in results.items():
        avg[name] = [100 * res[s]["eval"]["mIoU"] for s in seeds]
        per = [fmt(np.mean([100 * res[s]["eval"]["targets"][t]["mIoU"] for s in seeds])) for t in SPN_TARGETS]
        rows.append("| " + " | ".join([name, fmt(np.mean(avg[name]))] + [fmt(x) for x in avg[name]] + per) + " |")
    names = list(results)
    out = ["\n".join(rows), ""]
    if len(names) == 2:
        p = paired(avg[names[1]], avg[names[0]])
        out.append(f"Paired per-seed differences {names[1]} - {names[0]}: "
                   + ", ".join(f"{d:+.2f}" for d in p["diffs"]) + f"; mean {p['mean']:+.2f}; "
                   f"positive in {p['positive']}/{p['n']} seeds.")
    return "\n".join(out)


# ----------------------------------------------------------------------------- main

def git_commit() -> str:
    """The source tree's commit (``unknown`` for an installed copy: ROOT is then no source tree,
    and a git repository around it would be someone else's)."""
    if not (ROOT / "pyproject.toml").is_file():
        return "unknown"
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "eglp_dist", "configs", "tools"],
                               capture_output=True, text=True).stdout.strip()
        return head + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", nargs="?", default="eglp", choices=["eglp", "spn"])
    p.add_argument("--out", default=None, help="result folder (default: runs/ablation, runs/ablation_spn)")
    p.add_argument("--iters", type=int, default=None, help="iterations of each variant (default: 300 eglp, 1500 spn)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pretrain", type=int, default=0, metavar="ITERS",
                   help="stage 0: source-only iterations every variant starts from (0: random init)")
    p.add_argument("--pretrain-seed", type=int, default=0, help="seed of stage 0 (one stage 0 per study)")
    p.add_argument("--init", choices=["whole", "encoder"], default=None,
                   help="start from stage 0's whole model or its encoder only (default: whole for eglp, "
                        "encoder for spn)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every variant")
    p.add_argument("--night-strength", type=float, default=0.5, help="synthetic night's strength (0..1)")
    p.add_argument("--prompts", type=int, default=6, help="labelled night prompt images")
    p.add_argument("--val-images", type=int, default=24, help="validation images per target")
    p.add_argument("--train-images", type=int, default=96, help="training images per stream")
    p.add_argument("--only", nargs="*", default=None, help="variant names to run (default: the main rows)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing (stage 0 included): the tables of the runs finished so far")
    a = p.parse_args(argv)
    from eglp_dist import study

    a.iters = a.iters or {"eglp": 300, "spn": 1500}[a.study]
    a.init = a.init or DEFAULT_INIT[a.study]
    root = Path(a.out or {"eglp": "runs/ablation", "spn": "runs/ablation_spn"}[a.study])
    root.mkdir(parents=True, exist_ok=True)
    variants = VARIANTS if a.study == "eglp" else SPN_VARIANTS
    names = a.only or (DEFAULT_ROWS if a.study == "eglp" else list(SPN_VARIANTS))
    unknown = [n for n in names if n not in variants]
    if unknown:
        raise SystemExit(f"ablate: unknown variant(s) {unknown}; known: {list(variants)}")
    t0 = time.perf_counter()
    with open(root / "commands.sh", "a") as f:
        f.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} commit {git_commit()}: ablate {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    if a.study == "eglp":
        data = study.NightData(a.night_strength, a.prompts, a.val_images, a.train_images)
        data_args = study.eglp_data_args(data.prepare(root))
    else:
        from eglp_dist.data.offline.synth_tasks import prepare_dg_data

        data_args = spn_data_args(prepare_dg_data(root / "data" / f"dg_v{a.val_images}_t{a.train_images}",
                                                  n_train=a.train_images, n_val=a.val_images))
    common = common_args(a, root, data_args)
    results = run_all(a, root, variants, names, common)
    seeds = [s for s in a.seeds if all(s in results[n] for n in names)]  # every row finished
    if seeds != list(a.seeds):
        print(f"ablate: seeds with every row finished: {seeds} (of {a.seeds}); the tables use those", flush=True)
    results = {n: {s: r[s] for s in seeds} for n, r in results.items()}
    text = (eglp_tables if a.study == "eglp" else spn_tables)(results, seeds)
    if a.study == "eglp":
        eglp_chart(results, seeds, root / "class_iou.png")
    wall = time.perf_counter() - t0
    text += (f"\n\nCommit {git_commit()}; {a.iters} iterations per variant, stage 0 {a.pretrain} iterations "
             f"(init {a.init if a.pretrain else 'random'}), seeds {seeds}; this invocation {wall:.0f} s "
             f"(cached runs not retrained). Commands: {root / 'commands.sh'}.\n")
    (root / "ablation.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
