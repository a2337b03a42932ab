"""The launch scripts as users run them, with real launchers on CPU: the DeepSpeed launcher
starts 2 processes and trains; under torchrun (c10d rendezvous, restarts) a rank killed with
SIGKILL mid-run makes the group restart from the newest checkpoint and end with the same
weights, bit for bit, as an uninterrupted run; a stop request (SIGUSR1 or SIGTERM to one
worker, SIGTERM to the script) ends the job with 75 after a checkpoint, under both launchers,
with no restart and no traceback (launch/supervise.sh)."""
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from dist_harness import tiny_train_args
from eglp_dist.runtime.env import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo/tiny_source_only.yaml"


def _env(**extra):
    import sys

    venv_bin = str(Path(sys.executable).parent)
    return dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{venv_bin}:{os.environ['PATH']}",
                PYTHON=sys.executable, MASTER_PORT=str(free_port()), **extra)


_args = tiny_train_args


def _student(ckpt: Path):
    from eglp_dist.runtime.engines import export_fp32

    return export_fp32(ckpt / "engines" / "student")


def test_the_deepspeed_launcher_runs_two_processes_on_cpu(tiny_shards, tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "launch" / "deepspeed.sh"), CONFIG,
                           *_args(tiny_shards, tmp_path, "trainer.max_iters=2")],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 rank(s), gloo on cpu" in proc.stdout + proc.stderr
    assert (tmp_path / "demo_source_only" / "checkpoints" / "iter_0000002" / "COMPLETE").is_file()


def _workers(launcher: subprocess.Popen):
    """The training processes under a launch script (not torchrun's agent, not the DeepSpeed
    runner or its per-node launcher, whose command lines name eglp_dist too)."""
    out = []
    for p in psutil.Process(launcher.pid).children(recursive=True):
        cmd = p.cmdline()
        if "eglp_dist" in cmd and "train" in cmd and not any(
                "torch.distributed.run" in c or "deepspeed" in c for c in cmd[:4]):
            out.append(p)
    return out


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while text not in log.read_text():
        assert time.time() < deadline and proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)


def _launch_folders():
    import tempfile

    return Path(tempfile.gettempdir()).glob("eglp_launch.*")


STOP_CASES = [  # (launch script, whom, signal): two in the default run, all in `make test-all`
    ("torchrun", "worker", signal.SIGUSR1),
    ("deepspeed", "script", signal.SIGTERM),
    pytest.param("torchrun", "script", signal.SIGTERM, marks=pytest.mark.slow),
    pytest.param("torchrun", "worker", signal.SIGTERM, marks=pytest.mark.slow),
    pytest.param("deepspeed", "worker", signal.SIGTERM, marks=pytest.mark.slow),
    pytest.param("deepspeed", "worker", signal.SIGUSR1, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("script,whom,sig", STOP_CASES)
def test_a_stop_request_ends_the_job_with_75_after_a_checkpoint_without_restart(tiny_shards, tmp_path, script, whom, sig):
    log = tmp_path / "job.log"
    before = set(_launch_folders())
    with open(log, "w") as f:
        launcher = subprocess.Popen(
            ["bash", str(ROOT / "launch" / f"{script}.sh"), CONFIG,
             *_args(tiny_shards, tmp_path, "trainer.max_iters=400", "trainer.ckpt_interval=1000")],
            cwd=ROOT, env=_env(NPROC="2", MAX_RESTARTS="2", RUN_ID=f"t{free_port()}"),
            stdout=f, stderr=subprocess.STDOUT)
    try:
        _wait_for(log, "iter 3/400", launcher)
        if whom == "script":
            launcher.send_signal(sig)
        else:
            workers = _workers(launcher)
            assert len(workers) == 2, [w.cmdline() for w in workers]
            workers[-1].send_signal(sig)  # one rank: the control point makes it everyone's
        code = launcher.wait(timeout=180)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    text = log.read_text()
    assert code == 75, text[-4000:]
    assert f"stopped by {sig.name} at iteration" in text, text[-3000:]
    assert "Traceback" not in text and "SignalException" not in text, text[-4000:]
    assert text.count("run folder ") == 1, text[-4000:]  # one start: nothing restarted the group
    (stopped,) = (tmp_path / "demo_source_only" / "checkpoints").glob("iter_*")
    assert (stopped / "COMPLETE").is_file() and 3 <= int(stopped.name.split("_")[1]) < 400
    assert set(_launch_folders()) <= before  # the script removed its folder


@pytest.mark.slow  # two torchrun runs of 12 iterations: `make test-all` (what CI runs)
def test_a_rank_killed_under_torchrun_restarts_the_group_and_ends_bit_identical(tiny_shards, tmp_path):
    def run(out, log, kill_at=None):
        with open(log, "w") as f:
            launcher = subprocess.Popen(
                ["bash", str(ROOT / "launch" / "torchrun.sh"), CONFIG,
                 *_args(tiny_shards, out, "trainer.max_iters=12", "trainer.ckpt_interval=2")],
                cwd=ROOT, env=_env(NPROC="2", MAX_RESTARTS="1", RUN_ID=f"t{free_port()}"),
                stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        if kill_at:
            _wait_for(Path(log), kill_at, launcher, timeout=300)
            victims = _workers(launcher)
            assert len(victims) == 2
            victims[-1].send_signal(signal.SIGKILL)
        return launcher.wait(timeout=max(1, deadline - time.time()))

    assert run(tmp_path / "straight", tmp_path / "straight.log") == 0
    assert run(tmp_path / "killed", tmp_path / "killed.log", kill_at="iter 5/12") == 0, \
        (tmp_path / "killed.log").read_text()[-4000:]
    text = (tmp_path / "killed.log").read_text()
    assert "resumed from" in text  # the restarted group continued from a checkpoint
    final = "demo_source_only/checkpoints/iter_0000012"
    a, b = _student(tmp_path / "straight" / final), _student(tmp_path / "killed" / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_sbatch_script_parses_requeues_on_exit_75_and_signals_ahead_of_the_limit():
    """(Submitting it to real SLURM daemons is the cluster tier's test.)"""
    path = ROOT / "launch" / "slurm" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    text = path.read_text()
    from eglp_dist.control import EXIT_PREEMPTED

    assert "#SBATCH --signal=USR1@" in text and "#SBATCH --requeue" in text
    assert f'if [ "$rc" -eq {EXIT_PREEMPTED} ]' in text and 'scontrol requeue "${SLURM_JOB_ID}"' in text
