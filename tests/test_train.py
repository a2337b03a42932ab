"""The training loop end to end on 2 real gloo ranks: exact resume, artefacts, config errors."""

import pytest
import torch

from dist_harness import run_ranks
from training_runs import RESUME_SCHEDULE, assert_resume_exact, night_folders, night_overrides, shard_overrides
from eglp_dist.config import PACKAGE_CONFIG_ROOT, load_config

DEMO = PACKAGE_CONFIG_ROOT / "demo"


def _eval_checkpoint(env, config, overrides_, checkpoint):
    from eglp_dist.data.loader import build_eval_loader
    from eglp_dist.evaluate import evaluate
    from eglp_dist.models import build_segmentor
    from eglp_dist.weights import load_weights

    cfg = load_config(config, overrides_)
    model = build_segmentor(cfg.model)
    model.load_state_dict(load_weights(checkpoint))
    loader = build_eval_loader(cfg.data.val.acdc_night, cfg.data, env.rank, env.world_size, "cpu", name="val.acdc_night")
    return evaluate(model, loader, "cpu", cfg.model.num_classes).as_dict()


# zero2 in the slow tier (CI) to keep `make test` under 10 min; the default run keeps ZeRO's
# checkpoint round trip in test_engine (re-partitioned 2 -> 1, bit for bit)
@pytest.mark.parametrize("engine", ["ddp", pytest.param("zero2", marks=pytest.mark.slow)])
def test_uda_resume_is_exact_on_two_ranks(demo_shards, tmp_path, engine):
    """Every UDA part is on (FD, ClassMix, jitter/blur, HRDA boxes, MIC masks), so every source
    of randomness must be restored; the teacher too."""
    import json

    cfg = DEMO / "tiny_uda.yaml"
    common = [f"engine={engine}", "schedule.warmup_iters=2", "method.mic.enabled=true", "method.fd.enabled=true"]
    folders = night_folders(demo_shards)
    straight_dir, a, _ = assert_resume_exact(cfg, "demo_uda", tmp_path, folders, *common, modules=("teacher",))
    assert all(r["streams"]["target"]["step"] == 4 for r in a.ranks)
    # the evaluation done in training is the checkpoint's evaluation (every rank evaluated
    # rank 0's batch-norm statistics, which the checkpoint holds)
    in_training = json.loads((straight_dir / "eval.jsonl").read_text().splitlines()[-1])
    (from_checkpoint,) = run_ranks(_eval_checkpoint, 1, args=(
        cfg, shard_overrides(tmp_path / "a", folders, *RESUME_SCHEDULE, *common),
        str(straight_dir / "checkpoints" / "latest")))
    assert in_training["targets"]["acdc_night"]["IoU"] == from_checkpoint["IoU"]


def _buffer_digests(env, config, overrides_):
    """This rank's buffers (student engine and EMA teacher: batch-norm statistics) seen
    before each sync, and at each checkpoint and evaluation, as (event, iteration, values)."""
    import eglp_dist.train as T

    seen, kept = [], {}

    def values(method):
        modules = [e.model for e in method.engines.values()]
        modules += [m.module for m in method.modules.values() if isinstance(getattr(m, "module", None), torch.nn.Module)]
        return torch.cat([b.double().flatten() for mod in modules for b in mod.buffers()])

    def build(*args, **kwargs):
        method = kept["method"] = build_method(*args, **kwargs)
        sync = method.sync_buffers

        def recorded_sync():
            seen.append(("before sync", None, values(method)))
            sync()
        method.sync_buffers = recorded_sync
        return method

    def at(event, fn, it_arg):
        def recorded(*args, **kwargs):
            seen.append((event, args[it_arg], values(kept["method"])))
            return fn(*args, **kwargs)
        return recorded

    build_method, save, evaluate = T.build_method, T.save_checkpoint, T.run_evaluation
    T.build_method = build
    T.save_checkpoint, T.run_evaluation = at("checkpoint", save, 1), at("evaluation", evaluate, 6)
    try:
        T.train(load_config(config, overrides_))
    finally:
        T.build_method, T.save_checkpoint, T.run_evaluation = build_method, save, evaluate
    return seen


def test_every_rank_checkpoints_and_evaluates_one_model(demo_shards, tmp_path):
    """DDP runs without buffer broadcasts: the ranks' batch-norm statistics (student and EMA
    teacher) drift apart between syncs, and every checkpoint and evaluation sees rank 0's on
    every rank (an evaluation without a checkpoint at iteration 3, both at 4)."""
    args = night_overrides(demo_shards, tmp_path, "trainer.max_iters=4", "trainer.ckpt_interval=2", "trainer.eval_interval=3",
                     "schedule.warmup_iters=2")
    rank0, rank1 = run_ranks(_buffer_digests, 2, args=(DEMO / "tiny_uda.yaml", args))
    assert [e[:2] for e in rank0] == [e[:2] for e in rank1]
    events = [e[:2] for e in rank0 if e[0] != "before sync"]
    assert ("checkpoint", 2) in events and ("evaluation", 3) in events and ("checkpoint", 4) in events, events
    drifted = [not torch.equal(a[2], b[2]) for a, b in zip(rank0, rank1) if a[0] == "before sync"]
    assert any(drifted), "the ranks' statistics should differ before a sync (else this test shows nothing)"
    for a, b in zip(rank0, rank1):
        if a[0] != "before sync":
            assert torch.equal(a[2], b[2]), a[:2]


@pytest.mark.slow  # four 2-rank torchrun trainings: `make test-all` (what CI runs)
def test_demo_end_to_end_through_torchrun(tmp_path):
    """`eglp demo` as a user runs it: synth + pack, stage 0 and four 2-rank torchrun launches
    warm-started from it (the console entry, its exit path and the launcher's environment),
    evaluation, report with the pseudo-label weight and IoU, the per-class chart."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "eglp_dist", "demo", "--out", str(out), "--iters", "3",
                           "--pretrain", "2"], capture_output=True, text=True, timeout=500,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "mIoU" in proc.stdout and "tensorboard --logdir" in proc.stdout and "PIG-style" in proc.stdout and "EGLP" in proc.stdout
    assert "3 iterations each from a 2-iteration source-only stage 0" in proc.stdout
    assert "pseudo weight" in proc.stdout and "pseudo-label mIoU" in proc.stdout
    assert (out / "class_iou.png").stat().st_size > 1000
    assert list((out / "runs" / "demo_summary").glob("events.out.tfevents.*"))
    for name in ("source_only", "uda", "pig", "eglp"):
        (run,) = [p for p in (out / "runs").glob(f"{name}_s0_*") if p.is_dir()]
        result = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
        assert result["iter"] == 3 and 0.0 <= result["mIoU"] <= 1.0
        assert (run / "checkpoints" / "latest" / "COMPLETE").is_file()
        assert list((run / "tb").glob("events.out.tfevents.*"))
        assert (run / "config.yaml").is_file()


@pytest.mark.parametrize("override,message", [
    (None, "data.source.shards: no shard folder set for stream 'source'"),
    ("data.target.shards={missing}", "no manifest"),
])
def test_a_run_that_cannot_start_says_why_and_leaves_nothing(demo_shards, tmp_path, override, message):
    import subprocess
    import sys

    args = [f"run.out_dir={tmp_path / 'runs'}"]
    if override:
        args += [f"data.source.shards={demo_shards['cityscapes_train']}", override.format(missing=tmp_path / "nope")]
    proc = subprocess.run([sys.executable, "-m", "eglp_dist", "train", str(DEMO / "tiny_uda.yaml"), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()
