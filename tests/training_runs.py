"""What the end-to-end training tests share: overrides that point a config at the demo's
night shards, a checkpoint read back, and the exact-resume recipe (run straight; copy the
middle checkpoint into a fresh run folder; resume it to the end; compare bit for bit)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from dist_harness import run_ranks, train_worker

NIGHT_STREAMS = {"data.source": "cityscapes_train", "data.target": "acdc_night_train",
                 "data.val.acdc_night": "acdc_night_val"}
RESUME_SCHEDULE = ("trainer.max_iters=4", "trainer.eval_interval=100", "trainer.ckpt_interval=2")


def shard_overrides(out, folders: Dict[str, str], *extra) -> List[str]:
    """``run.out_dir``, each ``<stream>.shards``, a log line per iteration, pictures every 2."""
    return [f"run.out_dir={out}", *(f"{key}.shards={folder}" for key, folder in folders.items()),
            "trainer.log_interval=1", "trainer.image_interval=2", *extra]


def night_folders(shards, prompt: bool = False) -> Dict[str, str]:
    """Stream key -> shard folder for the demo's day -> night task (``prompt``: PIG/EGLP's
    prompt stream too)."""
    folders = {key: shards[name] for key, name in NIGHT_STREAMS.items()}
    if prompt:
        folders["data.prompt"] = shards["prompt_night"]
    return folders


def night_overrides(shards, out, *extra) -> List[str]:
    """``shard_overrides`` for the day -> night task's source, target and validation streams."""
    return shard_overrides(out, night_folders(shards), *extra)


@dataclass
class Checkpoint:
    engines: Dict[str, Dict[str, torch.Tensor]]  # name -> fp32 state_dict
    modules: Dict[str, dict]  # run-wide parts (modules.pt)
    ranks: List[dict]  # each rank's state (rank_*.pt), in rank order


def read_checkpoint(run_dir: Path, step: int, engines: Sequence[str] = ("student",)) -> Checkpoint:
    from eglp_dist.runtime.engines import export_fp32

    ckpt = run_dir / "checkpoints" / f"iter_{step:07d}"
    return Checkpoint({n: export_fp32(ckpt / "engines" / n) for n in engines},
                      torch.load(ckpt / "modules.pt", weights_only=False),
                      [torch.load(p, weights_only=False) for p in sorted(ckpt.glob("rank_*.pt"))])


def assert_same_tensors(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), (what, k)


def assert_resume_exact(config, run_name: str, tmp_path: Path, folders: Dict[str, str], *extra,
                        engines: Sequence[str] = ("student",), modules: Sequence[str] = ()):
    """4 iterations straight == the checkpoint at 2 copied into a fresh run folder and trained
    to 4, on 2 ranks: every engine's weights, the named run-wide parts, every rank's data
    positions and method generator, bit for bit; and every engine trained (a resume that
    silently restarted would differ). Returns (straight run folder, its and the resumed
    run's final checkpoints) for a recipe's own checks."""
    def args(out):
        return shard_overrides(out, folders, *RESUME_SCHEDULE, *extra)

    run_ranks(train_worker, 2, args=(config, args(tmp_path / "a")))
    straight, resumed = tmp_path / "a" / run_name, tmp_path / "b" / run_name
    shutil.copytree(straight / "checkpoints" / "iter_0000002", resumed / "checkpoints" / "iter_0000002")
    run_ranks(train_worker, 2, args=(config, args(tmp_path / "b")))
    a, b = read_checkpoint(straight, 4, engines), read_checkpoint(resumed, 4, engines)
    for name in engines:
        assert_same_tensors(a.engines[name], b.engines[name], name)
    for name in modules:
        assert_same_tensors(a.modules[name], b.modules[name], name)
    assert len(a.ranks) == len(b.ranks) == 2
    for ra, rb in zip(a.ranks, b.ranks):
        assert ra["streams"] == rb["streams"]
        assert torch.equal(ra["method"]["generator"], rb["method"]["generator"])
    first = read_checkpoint(straight, 2, engines)
    for name in engines:
        assert any(not torch.equal(first.engines[name][k], a.engines[name][k]) for k in a.engines[name]), \
            f"{name} did not train"
    return straight, a, b
