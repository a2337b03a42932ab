"""The loop's control point with real processes: stop signals (every rank stops at one step
boundary after a checkpoint, exit 75, resume is exact), non-finite steps (skipped on every
rank, K in a row stop the run after a checkpoint of the last good weights)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_harness import launcher_environ, run_ranks, train_with_method, tiny_train_args
from eglp_dist.config import PACKAGE_CONFIG_ROOT
from eglp_dist.runtime.env import free_port

CONFIG = PACKAGE_CONFIG_ROOT / "demo" / "tiny_source_only.yaml"


_args = tiny_train_args


def _student(ckpt: Path):
    from eglp_dist.runtime.engines import export_fp32

    return export_fp32(ckpt / "engines" / "student")


BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _same(a, b, params_only: bool = False) -> bool:
    keys = [k for k in a if not (params_only and k.endswith(BUFFERS))]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in keys)


def _train_and_keep(env, config, overrides):
    """`eglp train` on this rank; this rank's final student weights and skipped-step counts."""
    from eglp_dist.control import TooManyBadSteps

    m, error = train_with_method(config, overrides, (TooManyBadSteps,))
    return ({k: v.detach().clone() for k, v in m.student.model.state_dict().items()},
            {n: e.skipped_steps for n, e in m.engines.items()}, error)


@pytest.mark.parametrize("engine", ["ddp", pytest.param("zero2", marks=pytest.mark.slow)])
def test_an_injected_nan_is_skipped_on_every_rank_and_training_continues(tiny_shards, tmp_path, engine):
    args = _args(tiny_shards, tmp_path, "trainer.max_iters=3", "trainer.ckpt_interval=1",
                 "trainer.guard.inject_nan_steps=[2]", f"engine={engine}")
    (w0, s0, e0), (w1, s1, e1) = run_ranks(_train_and_keep, 2, args=(CONFIG, args))
    assert s0 == s1 == {"student": 1} and e0 is e1 is None  # both ranks skipped iteration 2 (NaN on rank 0 only)
    assert _same(w0, w1)  # and still hold one model
    ckpts = tmp_path / "demo_source_only" / "checkpoints"
    one, two, three = (_student(ckpts / f"iter_000000{i}") for i in (1, 2, 3))
    # the bad step changed no weight (batch-norm running statistics are the forward's, kept)
    assert _same(one, two, params_only=True) and not _same(one, two)
    assert not _same(two, three)  # training went on


def test_k_non_finite_steps_in_a_row_stop_the_run_after_a_checkpoint(tiny_shards, tmp_path):
    args = _args(tiny_shards, tmp_path, "trainer.max_iters=6", "trainer.ckpt_interval=1",
                 "trainer.guard.inject_nan_steps=[2,3]", "trainer.guard.max_bad_steps=2")
    (w0, s0, e0), (_, _, e1) = run_ranks(_train_and_keep, 2, args=(CONFIG, args))
    assert e0 and e0 == e1 and "2 non-finite steps in a row" in e0 and "iteration 3" in e0
    ckpts = tmp_path / "demo_source_only" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("iter_*")) == ["iter_0000001", "iter_0000002", "iter_0000003"]
    assert _same(_student(ckpts / "iter_0000003"), _student(ckpts / "iter_0000001"), params_only=True)  # last good weights
    assert s0 == {"student": 2}


def _launch(world: int, args, log_dir: Path):
    """`python -m eglp_dist train` as `world` processes with a launcher's environment (as srun
    starts one task per GPU); stdout/stderr of each rank in log_dir."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", **launcher_environ("torchrun", rank, world, port))
        out = open(log_dir / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "eglp_dist", "train", str(CONFIG), *args],
                                      env=env, stdout=out, stderr=subprocess.STDOUT))
    return procs


def _wait(procs, timeout=240):
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        codes.append(p.wait(timeout=max(1, deadline - time.time())))
    return codes


def test_sigusr1_to_one_rank_stops_every_rank_at_one_step_and_resume_is_exact(tiny_shards, tmp_path):
    args = _args(tiny_shards, tmp_path / "run", "trainer.max_iters=40", "trainer.ckpt_interval=100")
    logs = tmp_path / "logs1"
    logs.mkdir()
    procs = _launch(2, args, logs)
    deadline = time.time() + 180
    while "iter 3/40" not in (logs / "rank0.log").read_text():
        assert time.time() < deadline and procs[0].poll() is None, (logs / "rank0.log").read_text()[-3000:]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGUSR1)  # one rank only: the control point makes it everyone's
    assert _wait(procs) == [75, 75]
    text = (logs / "rank0.log").read_text()
    assert "SIGUSR1 received; checkpoint" in text and "stopped by SIGUSR1 at iteration" in text
    ckpts = tmp_path / "run" / "demo_source_only" / "checkpoints"
    (stopped,) = [p.name for p in ckpts.glob("iter_*")]
    step = int(stopped.split("_")[1])
    assert 3 <= step < 40
    # the job comes back (trainer.resume=auto) and finishes where an unstopped run does
    logs2 = tmp_path / "logs2"
    logs2.mkdir()
    assert _wait(_launch(2, args, logs2)) == [0, 0]
    assert f"resumed from {ckpts / stopped} at iteration {step}" in (logs2 / "rank0.log").read_text()
    straight = tmp_path / "straight"
    logs3 = tmp_path / "logs3"
    logs3.mkdir()
    assert _wait(_launch(2, _args(tiny_shards, straight, "trainer.max_iters=40", "trainer.ckpt_interval=100"), logs3)) == [0, 0]
    assert _same(_student(ckpts / "iter_0000040"),
                 _student(straight / "demo_source_only" / "checkpoints" / "iter_0000040"))


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tiny_shards, tmp_path, capsys):
    from dist_harness import train_worker

    args = _args(tiny_shards, tmp_path, "trainer.max_iters=2", "trainer.ckpt_interval=1")
    run_ranks(train_worker, 2, args=(CONFIG, args))
    ckpts = tmp_path / "demo_source_only" / "checkpoints"
    engine_file = ckpts / "iter_0000002" / "engines" / "student" / "engine.pt"
    with open(engine_file, "r+b") as f:  # a copy cut short / a full disk
        f.truncate(engine_file.stat().st_size // 3)
    from eglp_dist.runtime.checkpoint import find_latest

    capsys.readouterr()
    assert find_latest(ckpts) == (ckpts / "iter_0000001").resolve()
    (w,) = capsys.readouterr().err.splitlines()  # one plain line, no source line under it
    assert w.startswith("eglp: warning: ")
    assert f"checkpoint {ckpts / 'iter_0000002'} is damaged ({engine_file} has" in w
    assert f"resuming from {ckpts / 'iter_0000001'} instead" in w
    longer = [a for a in args if not a.startswith("trainer.max_iters")] + ["trainer.max_iters=3"]
    run_ranks(train_worker, 2, args=(CONFIG, longer))  # resumes from iteration 1, ends at 3
    assert (ckpts / "iter_0000003" / "COMPLETE").is_file()


def _rank1_stopped_at_iteration_3(tiny_shards, tmp_path, stop, *extra):
    """2 ranks; at iteration 3 ``stop(rank 1's process)``; (rank 0's exit code, seconds it took
    to exit after that, rank 0's error line)."""
    args = _args(tiny_shards, tmp_path / "run", "trainer.max_iters=200", "trainer.ckpt_interval=1000", *extra)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = _launch(2, args, logs)
    try:
        deadline = time.time() + 180
        while "iter 3/200" not in (logs / "rank0.log").read_text():
            assert time.time() < deadline and procs[0].poll() is None, (logs / "rank0.log").read_text()[-3000:]
            time.sleep(0.2)
        stop(procs[1])
        t0 = time.time()
        code = procs[0].wait(timeout=120)
        waited = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = (logs / "rank0.log").read_text()
    line = next((row for row in text.splitlines() if "eglp train: error: rank 0: iteration" in row), text[-3000:])
    return code, waited, line


def test_a_stopped_rank_makes_the_others_fail_in_bounded_time_naming_the_step(tiny_shards, tmp_path):
    code, waited, line = _rank1_stopped_at_iteration_3(  # alive but not answering
        tiny_shards, tmp_path, lambda p: p.send_signal(signal.SIGSTOP), "dist.step_timeout_s=5")
    assert code == 1 and waited < 60, (waited, line)
    assert "no answer within 5 s (dist.step_timeout_s)" in line and "another rank is stopped" in line


def test_a_killed_rank_is_said_to_have_left_not_to_have_timed_out(tiny_shards, tmp_path):
    code, _, line = _rank1_stopped_at_iteration_3(tiny_shards, tmp_path, lambda p: p.kill())  # its sockets close at once
    assert code == 1 and "rank 1 left (connection closed)" in line, line
    assert "no answer within" not in line


def test_a_stuck_loader_is_named_after_the_step_timeout():
    from eglp_dist.data.planning import Prefetcher, StalledStream

    release = __import__("threading").Event()

    def slow(step, slot):
        if step == 1:
            release.wait(30)  # stuck reading (an NFS stall)
        return step, slot

    pre = Prefetcher(slow, 1, 0, 1, 2, timeout=0.5)
    assert pre.get(0) == [(0, 0)]
    t0 = time.time()
    with pytest.raises(StalledStream, match="no batch for step 1 within 0.5 s"):
        pre.get(1)
    assert time.time() - t0 < 5
    release.set()
    pre.close()
