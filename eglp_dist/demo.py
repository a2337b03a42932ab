"""``make demo`` / ``eglp demo``: the whole system on a laptop CPU in a few minutes.

synthetic Cityscapes (day, labelled) + synthetic ACDC night (target train unlabelled, val
labelled) -> WebDataset shards -> ``torchrun --nproc_per_node 2 -m eglp_dist train`` of the
tiny HRDA, first source-only, then DAFormer/HRDA UDA, then the PIG-style night branch (NFNet
on 6 labelled synthetic night prompts, fused pseudo-labels), then EGLP (DNIS, DMS, RCM), with
the same seed, data and iterations -> night mIoU of each, side by side, and the TensorBoard
command.

The launch is the real one (torchrun, 2 gloo ranks), so the demo exercises exactly the code
path of a cluster run. Data and runs are reused if present (delete ``--out`` to start over).
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

from eglp_dist.config import PACKAGE_CONFIG_ROOT
from eglp_dist.dist.env import free_port

IMAGE_SIZE = (256, 128)  # W, H of the synthetic images
NIGHT_SHIFT = 0.5  # half-strength night: a real gap that self-training can close
N_TRAIN, N_VAL, N_PROMPT = 96, 24, 6
# Iterations of each of the four trainings: what keeps the whole demo under 10 minutes on 2
# cores (the tiny configs themselves say 600, the length docs/training.md measures).
DEMO_ITERS = 200
METHODS = ("source_only", "uda", "pig", "eglp")  # configs/demo/tiny_<method>.yaml, in this order
COLUMNS = {"source_only": "source-only", "uda": "UDA", "pig": "PIG-style", "eglp": "EGLP"}
DATASETS = [  # (layout, split, style, shift, images (None: n_train/n_val; "val": n_val), shard folder)
    ("cityscapes", "train", "day", 1.0, None, "cityscapes_train"),
    ("acdc", "train", "night", NIGHT_SHIFT, None, "acdc_night_train"),
    ("acdc", "val", "night", NIGHT_SHIFT, None, "acdc_night_val"),
    ("prompt", "train", "night", NIGHT_SHIFT, N_PROMPT, "prompt_night"),  # PIG/EGLP's few labelled nights
]


# The synthetic domain-generalisation task (tools/ablate.py spn): a "game"-style source and
# the same validation streets in four unseen styles, at full strength (and a Synthia split
# for the class-subset tests). Validation content is shared across the styles, so the
# targets differ in style only.
DG_DATASETS = [
    ("gta5", "train", "game", 1.0, None, "gta5_train"),
    ("cityscapes", "val", "day", 1.0, None, "cityscapes_val"),
    ("acdc", "val", "night", 1.0, None, "acdc_night_val"),
    ("foggy_cityscapes", "val", "fog", 1.0, None, "foggy_cityscapes_val"),
    ("rain_cityscapes", "val", "rain", 1.0, None, "rain_cityscapes_val"),
    ("synthia", "train", "game", 1.0, "val", "synthia_val"),  # as many as a val split
]


def prepare_data(out: Path, seed: int = 0, n_train: int = N_TRAIN, n_val: int = N_VAL,
                 size=IMAGE_SIZE, datasets=DATASETS, content_seeds=None) -> Dict[str, Path]:
    """Synthesise and pack the demo's splits (skipped where shards already exist). The
    tests use it too, with fewer and smaller images. ``content_seeds``: layout -> offset of
    its scene seed (default 1; the demo's source 0 and prompts 2 show other streets)."""
    content_seeds = {"cityscapes": 0, "prompt": 2} if content_seeds is None else content_seeds
    from eglp_dist.data.pack import pack
    from eglp_dist.data.synth import write_dataset

    shards = {}
    for layout, split, style, shift, count, name in datasets:
        n = n_val if "val" in (split, count) else count or n_train
        target = out / "shards" / name
        shards[name] = target
        if (target / "manifest.json").is_file():
            continue
        raw = out / "raw" / f"{layout}_{style}"
        write_dataset(layout, raw, n=n, splits=[split], style=style, size=size,
                      seed=seed + content_seeds.get(layout, 1), shift=shift)
        pack(layout, raw, split, target, shard_size=32, progress=False)
    return shards


def prepare_dg_data(out: Path, seed: int = 0, n_train: int = N_TRAIN, n_val: int = N_VAL,
                    size=IMAGE_SIZE) -> Dict[str, Path]:
    """The synthetic DG task's shards (:data:`DG_DATASETS`): every target shows the same
    validation streets (one content seed), the source other ones."""
    return prepare_data(out, seed, n_train, n_val, size, DG_DATASETS, content_seeds={"gta5": 0})


def train_command(config: Path, overrides: List[str]) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "-m", "eglp_dist", "train", str(config), *overrides]


def last_eval(run_dir: Path) -> dict:
    lines = (run_dir / "eval.jsonl").read_text().strip().splitlines()
    return json.loads(lines[-1])


def run_cli(args: argparse.Namespace) -> int:
    from eglp_dist.data.labels import CLASSES

    out = Path(args.out)
    t0 = time.perf_counter()
    shards = prepare_data(out)
    print(f"data ready in {out / 'shards'} ({time.perf_counter() - t0:.0f} s)", flush=True)
    common = [f"run.out_dir={out / 'runs'}",
              f"data.source.shards={shards['cityscapes_train']}",
              f"data.target.shards={shards['acdc_night_train']}",
              f"data.val.acdc_night.shards={shards['acdc_night_val']}",
              f"data.prompt.shards={shards['prompt_night']}"]
    iters = args.iters or DEMO_ITERS
    common += [f"trainer.max_iters={iters}", f"trainer.eval_interval={iters}", f"trainer.ckpt_interval={iters}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    results = {}
    for method in METHODS:
        config = PACKAGE_CONFIG_ROOT / "demo" / f"tiny_{method}.yaml"
        t1 = time.perf_counter()
        print(f"\n== {method}: 2 ranks (torchrun, gloo) ==", flush=True)
        code = subprocess.call(train_command(config, common), env=env)
        if code != 0:
            print(f"eglp demo: training {method} failed (exit {code})", file=sys.stderr)
            return code
        results[method] = last_eval(out / "runs" / f"demo_{method}")["targets"]["acdc_night"]
        print(f"{method}: {time.perf_counter() - t1:.0f} s", flush=True)

    print(f"\nnight validation (synthetic ACDC night, {N_VAL} images), "
          f"{DEMO_ITERS} iterations each, seed 0:")
    print(f"{'class':<15}" + "".join(f"{COLUMNS[m]:>13}" for m in METHODS))
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for name in CLASSES:
        print(f"{name:<15}" + "".join(f"{fmt(results[m]['IoU'][name]):>13}" for m in METHODS))
    print(f"{'mIoU':<15}" + "".join(f"{100 * results[m]['mIoU']:>13.2f}" for m in METHODS))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s.  TensorBoard: tensorboard --logdir {out / 'runs'}")
    return 0
