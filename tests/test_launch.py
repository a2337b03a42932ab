"""The launch scripts as users run them, with real launchers on CPU: the DeepSpeed launcher
starts 2 processes and trains; under torchrun (c10d rendezvous, restarts) a rank killed with
SIGKILL mid-run makes the group restart from the newest checkpoint and end with the same
weights, bit for bit, as an uninterrupted run."""
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from dist_harness import tiny_train_args
from eglp_dist.dist.env import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo/tiny_source_only.yaml"


@pytest.fixture
def shards(tiny_shards):
    return tiny_shards


def _env(**extra):
    import sys

    venv_bin = str(Path(sys.executable).parent)
    return dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{venv_bin}:{os.environ['PATH']}",
                PYTHON=sys.executable, MASTER_PORT=str(free_port()), **extra)


_args = tiny_train_args


def _student(ckpt: Path):
    from eglp_dist.dist.engine import export_fp32

    return export_fp32(ckpt / "engines" / "student")


def test_the_deepspeed_launcher_runs_two_processes_on_cpu(shards, tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "launch" / "deepspeed.sh"), CONFIG,
                           *_args(shards, tmp_path, "trainer.max_iters=2")],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 rank(s), gloo on cpu" in proc.stdout + proc.stderr
    assert (tmp_path / "demo_source_only" / "checkpoints" / "iter_0000002" / "COMPLETE").is_file()


def _workers(launcher: subprocess.Popen):
    return [p for p in psutil.Process(launcher.pid).children(recursive=True)
            if "eglp_dist" in " ".join(p.cmdline()) and "train" in p.cmdline()]


@pytest.mark.slow  # two torchrun runs of 12 iterations: `make test-all` (what CI runs)
def test_a_rank_killed_under_torchrun_restarts_the_group_and_ends_bit_identical(shards, tmp_path):
    def run(out, log, kill_at=None):
        with open(log, "w") as f:
            launcher = subprocess.Popen(
                ["bash", str(ROOT / "launch" / "torchrun.sh"), CONFIG,
                 *_args(shards, out, "trainer.max_iters=12", "trainer.ckpt_interval=2")],
                cwd=ROOT, env=_env(NPROC="2", MAX_RESTARTS="1", RUN_ID=f"t{free_port()}"),
                stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        if kill_at:
            while kill_at not in Path(log).read_text():
                assert time.time() < deadline and launcher.poll() is None, Path(log).read_text()[-3000:]
                time.sleep(0.2)
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
