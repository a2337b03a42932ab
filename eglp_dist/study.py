"""Warm-started studies on synthetic data: the pieces ``tools/ablate.py`` and ``eglp demo``
share (data by its knobs, stage 0, cached runs, what a run logged, paired statistics).

Why a warm start: DAFormer's 0.968 pseudo-label threshold, the EMA teacher and the
method's fusion rules all assume an ImageNet-pretrained encoder; from random weights a
300-iteration run leaves the pseudo-label weight at ~0 and every pseudo-label part without
effect. A study here therefore runs

* **stage 0** once: a source-only run on the synthetic day source (``--pretrain`` iterations);
* every **variant** from it: the whole source-only model (``model.init_from``: encoder, heads,
  HRDA attention, the way many self-training works start from a source-trained model) or
  its encoder only (``model.pretrained``: the analogue of an ImageNet checkpoint), with the
  recipe :data:`WARM_RECIPE` written down before any run.

Every run is a real ``torchrun`` of ``eglp train`` (2 gloo ranks), cached under a folder
named by a hash of its settings (config file, overrides, seed, iterations, protocol): a
study stopped half-way reuses every finished run and resumes an interrupted one from its
last checkpoint. Every command is appended to ``commands.sh`` in the result folder.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from eglp_dist.config import PACKAGE_CONFIG_ROOT
from eglp_dist.runtime.env import free_port

# Bumped whenever a method's behaviour changes in a way that makes earlier cached runs stale
# (the hash of a run's folder includes it).
PROTOCOL = 2

# The recipe of every warm-started variant, fixed before running and never tuned per variant:
# the papers' AdamW lr for a pretrained network, 6e-5 with the heads at x10 (DAFormer/HRDA;
# the tiny configs' 6e-4 was chosen for a random init), and no ImageNet feature distance (it
# needs an ImageNet copy of the encoder; ours would be the stage-0 encoder).
WARM_RECIPE = ("optim.lr=6e-5", "optim.head_lr_mult=10", "method.fd.enabled=false")

# Classes that should gain from a night-specific treatment, fixed in advance from the
# synthetic night's *designed* change (synth_render.night_change(): 1 - brightness factor),
# never from a run's own DNIS: every class darkened to <= 0.65 of its day brightness.
CHANGED_MIN = 0.35


def classes_to_gain() -> List[str]:
    from eglp_dist.data.labels import CLASSES
    from eglp_dist.data.offline.synth_render import night_change

    change = night_change()
    return [CLASSES[c] for c in range(len(CLASSES)) if change[c] >= CHANGED_MIN - 1e-6]


def rare_classes() -> List[str]:
    from eglp_dist.data.labels import CLASSES
    from eglp_dist.methods.config import EGLP_RARE

    return [CLASSES[c] for c in EGLP_RARE]


# ----------------------------------------------------------------------------- the data

@dataclass(frozen=True)
class NightData:
    """The synthetic day -> night task's knobs (``eglp demo``'s defaults)."""
    night_strength: float = 0.5  # half-strength night: a real gap that self-training can close
    prompts: int = 6  # labelled night prompt images
    val_images: int = 24
    train_images: int = 96

    def folder(self, root: Path) -> Path:
        return Path(root) / "data" / (f"night{self.night_strength:g}_p{self.prompts}_v{self.val_images}"
                                      f"_t{self.train_images}")

    def prepare(self, root: Path) -> Dict[str, Path]:
        from eglp_dist.data.offline.synth_tasks import night_datasets, prepare_data

        return prepare_data(self.folder(root), n_train=self.train_images, n_val=self.val_images,
                            datasets=night_datasets(self.night_strength, self.prompts))


def eglp_data_args(shards: Mapping[str, Path]) -> List[str]:
    return [f"data.source.shards={shards['cityscapes_train']}", f"data.target.shards={shards['acdc_night_train']}",
            f"data.val.acdc_night.shards={shards['acdc_night_val']}", f"data.prompt.shards={shards['prompt_night']}"]


# ------------------------------------------------------------------------------- runs

@dataclass(frozen=True)
class RunSpec:
    """One training: a shipped config (``configs/demo/NAME.yaml``) with overrides."""
    name: str  # a human label (folder prefix)
    config: str
    overrides: tuple
    seed: int
    iters: int

    def key(self, root: Path) -> str:
        """A hash of everything that changes the result; paths under the study folder
        ``root`` count relative to it, so ``--out runs/x`` and ``--out /abs/runs/x`` (or a
        moved study folder) name the same runs."""
        config_text = (PACKAGE_CONFIG_ROOT / "demo" / f"{self.config}.yaml").read_text()
        overrides = [relative_to_study(o, root) for o in self.overrides]
        blob = json.dumps({**asdict(self), "name": None, "overrides": overrides, "config_text": config_text,
                           "protocol": PROTOCOL}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]

    def folder_name(self, root: Path) -> str:
        return f"{slug(self.name)}_s{self.seed}_{self.key(root)}"


def relative_to_study(override: str, root: Path) -> str:
    """``KEY=VALUE`` with the study folder's path (as given or absolute) in VALUE as ``{out}``."""
    for prefix in sorted({str(Path(root).resolve()), str(Path(root))}, key=len, reverse=True):
        override = override.replace(prefix + os.sep, "{out}" + os.sep)
    return override


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def train_command(config: Path, overrides: Sequence[str], nproc: int = 2) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), "-m", "eglp_dist", "train", str(config), *overrides]


def finished(run_dir: Path, iters: int) -> bool:
    f = Path(run_dir) / "eval.jsonl"
    return f.is_file() and any(json.loads(line).get("iter") == iters for line in f.read_text().splitlines() if line)


def run_cached(spec: RunSpec, root: Path, extra_args: Sequence[str] = (), quiet: bool = True,
               log_interval: Optional[int] = None) -> Path:
    """Train ``spec`` under ``root/runs/`` unless a finished run with the same settings is
    there (an interrupted one resumes from its last checkpoint); returns its run folder.
    ``extra_args`` never change the result (not hashed): paths of the data already in the
    overrides' hash through the data folder's name."""
    runs = Path(root) / "runs"
    name = spec.folder_name(root)
    run_dir = runs / name
    args = [f"run.out_dir={runs}", f"run.name={name}", f"run.seed={spec.seed}", *spec.overrides, *extra_args,
            f"trainer.max_iters={spec.iters}", f"trainer.eval_interval={spec.iters}",
            f"trainer.ckpt_interval={max(spec.iters // 4, 1)}",
            f"trainer.log_interval={log_interval or max(spec.iters // 20, 1)}", "trainer.resume=auto"]
    cmd = train_command(PACKAGE_CONFIG_ROOT / "demo" / f"{spec.config}.yaml", args)
    shown = " ".join(shlex.quote(c) for c in cmd)
    record = Path(root) / "commands.sh"
    if finished(run_dir, spec.iters):
        _append(record, f"# {spec.name} seed {spec.seed}: finished before, reused ({run_dir})\n")
        print(f"  {name}: done before, reused", flush=True)
        return run_dir
    _append(record, f"# {spec.name} seed {spec.seed}\nOMP_NUM_THREADS=1 {shown}\n")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "command.sh").write_text(shown + "\n")
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if quiet:
        with open(runs / f"{name}.log", "a") as f:
            code = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    else:
        code = subprocess.call(cmd, env=env)
    if code != 0:
        raise SystemExit(f"{spec.name} seed {spec.seed} failed (exit {code}); see {runs / (name + '.log')}")
    print(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


def _append(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(text)


def warm_start_args(stage0_dir: Path, init: str) -> List[str]:
    """Overrides that start a variant from stage 0: the whole model or its encoder only."""
    ckpt = Path(stage0_dir) / "checkpoints" / "latest"
    if init == "whole":
        return [f"model.init_from={ckpt}"]
    if init == "encoder":
        return [f"model.pretrained={ckpt / 'engines' / 'student' / 'engine.pt'}"]
    raise ValueError(f"init must be 'whole' or 'encoder', got {init!r}")


# ------------------------------------------------------------------- what a run logged

def train_log(run_dir: Path) -> List[dict]:
    """Every log interval's global values (``train.jsonl``, written by the Monitor)."""
    f = Path(run_dir) / "train.jsonl"
    if not f.is_file():
        return []
    by_iter = {}  # a resumed run logs the iterations after its checkpoint again: keep the last
    for line in f.read_text().splitlines():
        if line:
            r = json.loads(line)
            by_iter[r["iter"]] = r
    return [by_iter[i] for i in sorted(by_iter)]


def second_half_mean(records: Sequence[dict], key: str, iters: int) -> float:
    """Mean of ``key`` over the log intervals that end in the second half of the run."""
    vals = [r[key] for r in records if r.get("iter", 0) > iters / 2 and r.get(key) is not None]
    return float(np.mean(vals)) if vals else float("nan")


def last_eval(run_dir: Path) -> dict:
    lines = (Path(run_dir) / "eval.jsonl").read_text().strip().splitlines()
    return json.loads(lines[-1])


def mean_iou_of(iou: Mapping[str, Optional[float]], classes: Sequence[str]) -> float:
    vals = [iou[c] for c in classes if iou.get(c) is not None and not _isnan(iou[c])]
    return float(np.mean(vals)) if vals else float("nan")


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def pseudo_iou_of(records: Sequence[dict], source: str, classes: Optional[Sequence[str]], iters: int,
                  weighted: bool = False) -> float:
    """Second-half mean of a pseudo-label source's IoU: its mIoU, or the mean over ``classes``."""
    prefix = f"pseudo_iou{'_weighted' if weighted else ''}/{source}/"
    if classes is None:
        return second_half_mean(records, prefix + "mIoU", iters)
    vals = [second_half_mean(records, prefix + c, iters) for c in classes]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


# ------------------------------------------------------------------- paired statistics

def paired(a: Sequence[float], b: Sequence[float]) -> dict:
    """Per-seed differences a - b (same seeds, same order), their mean and sign count."""
    d = [x - y for x, y in zip(a, b)]
    return {"diffs": d, "mean": float(np.mean(d)) if d else float("nan"),
            "positive": sum(x > 0 for x in d), "negative": sum(x < 0 for x in d), "n": len(d)}


def fmt(v: float, digits: int = 2) -> str:
    return "n/a" if v is None or _isnan(v) else f"{v:.{digits}f}"
