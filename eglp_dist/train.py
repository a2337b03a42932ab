"""The training loop: iteration based, one method step per iteration, every rank alike.

    streams -> method.step(batches, it) -> monitor  [-> evaluate] [-> checkpoint]

Everything a step depends on is either rebuilt identically from the config (models, the
frozen ImageNet copy) or lives in a checkpoint (engines with optimiser and lr schedule,
EMA teachers, data-stream positions, the method's generator and each rank's RNG streams),
so ``trainer.resume=auto`` continues exactly where the last complete checkpoint stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import random
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch

from eglp_dist.config import load_config, resolved_yaml, to_plain
from eglp_dist.control import (ControlPoint, RankLost, StopRequested, TooManyBadSteps, as_rank_lost,
                               startup_timeout, step_timeouts, stopped_for_launcher)
from eglp_dist.data.leaks import check_streams_disjoint
from eglp_dist.data.loader import build_eval_loader, build_train_stream
from eglp_dist.runtime import comm
from eglp_dist.runtime.checkpoint import (find_latest, load_checkpoint, read_run_state, resolve_checkpoint,
                                      save_checkpoint, saved_world_size)
from eglp_dist.runtime.precision import autocast_dtype
from eglp_dist.runtime.env import detect_env, init_distributed, shutdown
from eglp_dist.errors import ConfigError
from eglp_dist.methods import build_method
from eglp_dist.methods.base import method_seed
from eglp_dist.metrics import format_table
from eglp_dist.logging import Monitor
from eglp_dist.notices import warning
from eglp_dist.run_folder import (RunFolderBusy, RunLock, check_fresh_start, check_resume_config,
                                  record_attempt, run_dir_of)


def checkpoint_to_resume(cfg, ckpt_root: Path) -> Optional[Path]:
    """The checkpoint this run continues, checked to belong to this config (run_folder)."""
    resume = cfg.trainer.resume
    if resume == "never":
        check_fresh_start(ckpt_root, find_latest(ckpt_root) is not None)
        return None
    if resume == "auto":
        path = find_latest(ckpt_root)
    else:
        try:
            path = resolve_checkpoint(resume)
        except FileNotFoundError as exc:
            raise ConfigError(f"trainer.resume: {exc}") from exc
    if path is not None:
        check_resume_config(path, read_run_state(path).get("config", {}), to_plain(cfg))
    return path


@contextlib.contextmanager
def run_folder_lock(run_dir: Path, env) -> Iterator[None]:
    """Rank 0 holds the run folder's lock for the run's lifetime; its verdict is broadcast,
    so every rank stops with the same error when another job holds it."""
    lock = RunLock(run_dir)
    verdict = ("ok", None)
    if env.is_main:
        try:
            verdict = ("ok", lock.acquire())
        except RunFolderBusy as exc:
            verdict = ("busy", str(exc))
    verdict = comm.broadcast_object(verdict)
    if verdict[0] == "busy":
        raise RunFolderBusy(verdict[1])
    if verdict[1] and env.is_main:
        warning(verdict[1])
    try:
        yield
    finally:
        if env.is_main:
            lock.release()


def seed_rank(seed: int, rank: int, step: int = 0) -> None:
    """Per-rank streams for what the method does not draw itself (dropout, drop-path); a
    function of (seed, rank, step), so a rank a checkpoint lacks starts its own streams."""
    s = method_seed(seed, rank) + 1 + 7_919 * step
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def should(it: int, interval: int, max_iters: int) -> bool:
    """After ``it`` iterations: every ``interval`` and at the end."""
    return it % interval == 0 or it == max_iters


def check_evaluable(cfg) -> None:
    """A run that would train for hours and never evaluate, because no validation target has
    shards, is refused: evaluation is switched off by saying so (``trainer.eval_interval=0``)."""
    if cfg.trainer.eval_interval == 0 or any(t.shards for t in cfg.data.val.values()):
        return
    names = ", ".join(f"data.val.{n}.shards" for n in cfg.data.val) or "data.val (no targets)"
    raise ConfigError(f"no validation stream to evaluate: {names} empty; give a target its shards, "
                      f"or switch evaluation off with trainer.eval_interval=0")


def train(cfg, local_rank: Optional[int] = None) -> Dict[str, Any]:
    """Train ``cfg`` on this process's rank; returns the last evaluation (``as_dict``) or {}.
    Initialises the process group if none exists and leaves it for the caller to shut down."""
    env = detect_env(local_rank_arg=local_rank)
    device = init_distributed(env, cfg.dist.backend, cfg.dist.timeout_s)
    run_dir = run_dir_of(cfg)
    method = build_method(cfg, env, device)
    check_streams_disjoint(cfg, method.streams)  # prompt/target images must not be evaluation images
    streams = {name: build_train_stream(getattr(cfg.data, name), cfg.data, env.rank, env.world_size,
                                        seed=cfg.run.seed, device=device, name=name,
                                        ground_truth=name in method.ground_truth_streams)
               for name in method.streams}
    # every target with shards, in config order; none when evaluation is off
    check_evaluable(cfg)
    val_loaders = {name: build_eval_loader(target, cfg.data, env.rank, env.world_size, device,
                                           name=f"val.{name}")
                   for name, target in cfg.data.val.items() if target.shards and cfg.trainer.eval_interval > 0}
    seed_rank(cfg.run.seed, env.rank)
    # only once everything is built: a config that cannot start leaves no run folder
    with run_folder_lock(run_dir, env):
        return _train_locked(cfg, env, device, method, streams, val_loaders, run_dir)


def _train_locked(cfg, env, device, method, streams, val_loaders, run_dir: Path) -> Dict[str, Any]:
    t = cfg.trainer
    ckpt_root = run_dir / "checkpoints"
    resume_from = checkpoint_to_resume(cfg, ckpt_root)
    if env.is_main:
        record_attempt(run_dir, resolved_yaml(cfg))
    comm.barrier()
    control = ControlPoint(t.guard, device)
    start, state = resume(resume_from, cfg, env, method, streams, control)
    save = functools.partial(save_run, cfg, method, streams, control, ckpt_root)
    monitor = Monitor(run_dir, env.is_main, start, t.max_iters, sum(s.batch_size for s in streams.values()))
    monitor.write(start_line(cfg, env, device, run_dir, start))
    if resume_from is not None:
        for line in resume_report(resume_from, state, start, cfg, env, method):
            monitor.write(line)
    last_eval: Dict[str, Any] = {}
    for engine in method.engines.values():
        engine.train()
    for stream in streams.values():
        stream.wait_timeout = cfg.dist.step_timeout_s
    where = {"it": start, "phase": "start-up"}
    try:
        with control, step_timeouts(cfg.dist):  # stop signals are caught from here on, acted on below
            for it in range(start + 1, t.max_iters + 1):  # `it` iterations done after this one
                where.update(it=it, phase="waiting for this rank's batches")
                batches = {name: next(stream) for name, stream in streams.items()}
                control.inject_faults(it, env.is_main, method)
                where["phase"] = "the step (its gradient all-reduce)"
                logs = method.step(batches, it - 1)
                where["phase"] = "the control point's flag all-reduce"
                decision = guard_step(control, method, monitor, logs, it, t, save)
                evaluated = after_step(it, decision, cfg, method, monitor, val_loaders, device, run_dir,
                                       save, where)
                last_eval = last_eval if evaluated is None else evaluated
    except RuntimeError as exc:  # collectives' timeouts, and planning.StalledStream
        lost = as_rank_lost(exc, where["it"], where["phase"], cfg.dist, env.rank, env.world_size)
        if lost is None:
            raise
        raise lost from exc
    finally:
        for stream in streams.values():
            stream.close()
        monitor.close()
    return last_eval


def start_line(cfg, env, device, run_dir: Path, start: int) -> str:
    """The log's first line: where, on what, which method, which iterations."""
    precision = autocast_dtype(cfg.engine.precision, device) or "fp32"
    return (f"run folder {run_dir} | {env.world_size} rank(s), {comm.backend()} on {device.type} | "
            f"engine {cfg.engine.kind}, precision {precision} | method {cfg.method.name} | "
            f"iterations {start}..{cfg.trainer.max_iters}")


def save_run(cfg, method, streams, control, ckpt_root: Path, it: int) -> Path:
    """A checkpoint of everything that changes during training, after iteration ``it``."""
    with startup_timeout(cfg.dist):  # writing may take longer than a step
        method.sync_buffers()  # one model on every rank (see Engine.sync_buffers)
        return save_checkpoint(ckpt_root, it, method.engines, method.modules,
                               {"method": cfg.method.name, "config": to_plain(cfg),
                                "control": control.state_dict()},
                               {"streams": {n: s.state_dict() for n, s in streams.items()},
                                "method": method.state_dict()},
                               keep_last=cfg.trainer.keep_last)


def after_step(it: int, decision, cfg, method, monitor, val_loaders, device, run_dir: Path, save,
               where: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """What follows iteration ``it`` on every rank alike: logs and images at their intervals,
    the checkpoint (before evaluating: an evaluation that fails must not cost it), a stop
    request acted on, the evaluation. Returns the evaluation's metrics when one ran."""
    t = cfg.trainer
    if should(it, t.log_interval, t.max_iters):
        monitor.flush(it, {f"lr/{k}": v for k, v in method.lrs().items()}, method.counters())
    if it % t.image_interval == 0:
        monitor.images(it, method.visuals(), cfg.data.mean, cfg.data.std)
    evaluate_now = t.eval_interval > 0 and should(it, t.eval_interval, t.max_iters)
    save_now = should(it, t.ckpt_interval, t.max_iters) or decision.stop is not None
    where["phase"] = "the checkpoint"
    path = save(it) if save_now else None
    if decision.stop is not None:
        monitor.write(f"iter {it}: {decision.stop} received; checkpoint {path} written, stopping")
        raise StopRequested(decision.stop, it, path)
    if not evaluate_now:
        return None
    where["phase"] = "the evaluation"
    with startup_timeout(cfg.dist):
        if not save_now:
            method.sync_buffers()
        return run_evaluation(method, val_loaders, cfg, device, monitor, run_dir, it)


def resume(resume_from, cfg, env, method, streams, control) -> tuple:
    """(iteration to start after, the checkpoint's run state): engines, parts, data streams
    and the control point from ``resume_from``; (0, {}) for a fresh run. A rank the
    checkpoint did not have starts its own streams and per-rank state from (seed, rank, step)."""
    if resume_from is None:
        return 0, {}
    state, rank_state = load_checkpoint(resume_from, method.engines, method.modules)
    start = int(state["step"])
    for name, stream in streams.items():
        stream.load_state_dict(rank_state["streams"][name])
    control.load_state_dict(state.get("control", {}))  # run-wide: decided alike on every rank
    if rank_state.get("fresh"):  # a rank the checkpoint did not have (more ranks now)
        seed_rank(cfg.run.seed, env.rank, start)
        method.reseed(start)
    else:
        method.load_state_dict(rank_state["method"])
    return start, state


def resume_report(resume_from, state, start: int, cfg, env, method) -> list:
    """What a resume changed, in the log's words: the run length and the world size."""
    t = cfg.trainer
    lines = [f"resumed from {resume_from} at iteration {start}" + (" (run already complete)" if start >= t.max_iters else "")]
    saved_iters = state.get("config", {}).get("trainer", {}).get("max_iters", t.max_iters)
    if saved_iters != t.max_iters:
        lines.append(f"trainer.max_iters changed from {saved_iters} to {t.max_iters}: from iteration {start} on, "
                     f"the lr schedule (poly decay to iteration {t.max_iters}) follows the new length; the run "
                     f"differs from one planned for {t.max_iters} iterations from the start")
    saved = saved_world_size(resume_from, state)
    if saved != env.world_size:
        lines.append(f"the checkpoint was written by {saved} rank(s), this run has {env.world_size}: "
                     f"ranks 0..{min(saved, env.world_size) - 1} continue their own data and random streams, "
                     + (f"ranks {saved}..{env.world_size - 1} start new ones from (seed, rank, step) and an "
                        f"empty per-rank method state (e.g. EGLP's rare-class memory); "
                        if env.world_size > saved else f"the streams of ranks {env.world_size}..{saved - 1} end; ")
                     + "run-wide state (EMA teachers, DNIS, RCM's class confidences) is the checkpoint's on every rank; "
                     + "".join(f"engine {n!r}: ZeRO optimizer state re-partitioned from {saved} to "
                               f"{env.world_size} rank(s); " for n, e in method.engines.items() if e.kind == "zero")
                     + "the global batch and the batches themselves differ from the uninterrupted run")
    return lines


def guard_step(control, method, monitor, logs, it: int, t, save):
    """The control point after a step: one flag reduction, the same decision on every rank
    (a skipped step said in the log; too many in a row end the run with the last good weights)."""
    decision = control.after_step(any(e.last_step_skipped for e in method.engines.values()))
    if decision.skipped:
        monitor.write(f"iter {it}: non-finite loss or gradients, optimizer step skipped "
                      f"({control.bad_in_a_row} in a row, {control.bad_total} in all)")
    logs["guard.skipped_steps"] = torch.tensor(float(control.bad_total))
    monitor.accumulate(logs)
    if decision.too_many_bad:
        path = save(it)  # the weights of the last good step (skipped steps changed none)
        raise TooManyBadSteps(f"{control.bad_in_a_row} non-finite steps in a row (trainer.guard.max_bad_steps="
                              f"{t.guard.max_bad_steps}) at iteration {it}; the last good weights are in {path}")
    return decision


def run_evaluation(method, loaders, cfg, device, monitor: Monitor, run_dir: Path, it: int) -> Dict[str, Any]:
    """Every target evaluated (one collective for all), logged and appended to eval.jsonl."""
    from eglp_dist.evaluate import evaluate_targets, format_targets, results_dict

    model = method.eval_model()
    results = evaluate_targets(model, loaders, device, cfg.model.num_classes,
                               autocast_dtype=autocast_dtype(cfg.engine.precision, device))
    result = dict(results_dict(results), iter=it)
    monitor.evaluation(it, results)
    if comm.rank() == 0:
        with open(run_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        if it == cfg.trainer.max_iters:
            for name, r in results.items():
                monitor.write(f"== {name}\n" + format_table(r.metrics, class_sets=r.class_sets))
            monitor.write(format_targets(results))
    for engine in method.engines.values():
        engine.train()
    return result


def run_cli(args: argparse.Namespace) -> int:
    """``eglp train``: 0 when the run is complete; :data:`control.EXIT_PREEMPTED` (75) when
    every rank stopped on a stop signal after a checkpoint (requeue and resume; behind
    launch/torchrun.sh or launch/deepspeed.sh the worker leaves a mark and exits 0, the script
    75: ``control.LAUNCH_DIR_ENV``); 1 after too
    many non-finite steps in a row (the last good weights checkpointed)."""
    cfg = load_config(args.config, args.overrides)
    try:
        train(cfg, local_rank=args.local_rank)
    except StopRequested as exc:
        if comm.rank() == 0:
            print(f"eglp train: {exc}", file=sys.stderr, flush=True)
        return stopped_for_launcher(str(exc))
    except TooManyBadSteps as exc:
        if comm.rank() == 0:
            print(f"eglp train: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except RankLost as exc:  # every rank that notices says so: the stuck one may be any
        print(f"eglp train: error: rank {comm.rank()}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        shutdown()
    return 0
