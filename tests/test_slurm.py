"""Real SLURM on this machine: munge, slurmctld and slurmd started by the fixture (installed
from Debian's packages if missing), `launch/slurm/train.sbatch` submitted with the tiny
config, preempted with SIGUSR1 mid-run, requeued by the script, and finished by the rerun with
the same final weights as a job that was never interrupted. Skipped, with the reason printed,
only where the daemons cannot run (not root, no packages)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_harness import tiny_train_args
from eglp_dist.config import PACKAGE_CONFIG_ROOT
from eglp_dist.runtime.env import free_port
from slurm_cluster import IFNAME, cluster, wait_done, wait_for

ROOT = Path(__file__).resolve().parents[1]
CONFIG = PACKAGE_CONFIG_ROOT / "demo" / "tiny_source_only.yaml"

pytestmark = pytest.mark.slow  # starts daemons and runs jobs: `make test-all` (CI)


def _cluster(tmp_path_factory, nodes):
    with cluster(tmp_path_factory.mktemp(f"slurm{nodes}"), nodes) as (c, why):
        if c is None:
            print(f"SKIP real-SLURM test ({nodes} node(s)): {why}")
            pytest.skip(why)
        yield c


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    yield from _cluster(tmp_path_factory, 1)


def _overrides(tiny_shards, out, iters):
    return tiny_train_args(tiny_shards, out, f"trainer.max_iters={iters}", "trainer.ckpt_interval=1000")


def _submit(c, out: Path, log: Path, tiny_shards, iters: int, nodes: int = 1) -> str:
    per_node = 2 // nodes
    cmd = ["sbatch", "--parsable", "--nodes", str(nodes), "--ntasks-per-node", str(per_node), "--gpus-per-node", "0",
           "--cpus-per-task", "1", "--time", "20", "--output", str(log),
           "--export", "ALL,OMP_NUM_THREADS=1" + (f",GLOO_SOCKET_IFNAME={IFNAME}" if nodes > 1 else ""),
           str(ROOT / "launch" / "slurm" / "train.sbatch"), str(CONFIG), *_overrides(tiny_shards, out, iters)]
    proc = c.run(cmd, cwd=ROOT, env=dict(c.env, PY=sys.executable), check=True)
    return proc.stdout.strip().split(";")[0]


def _student(run: Path, it: int):
    from eglp_dist.runtime.engines import export_fp32

    return export_fp32(run / "demo_source_only" / "checkpoints" / f"iter_{it:07d}" / "engines" / "student")


def _preempt_and_finish(c, tiny_shards, tmp_path, iters, nodes, scancel=("--signal=USR1",), sig="SIGUSR1"):
    """Submit, signal at iteration 3 (default: SIGUSR1 to the tasks), wait for the script's
    requeue and the rerun."""
    log = tmp_path / "preempted.out"
    job = _submit(c, tmp_path / "preempted", log, tiny_shards, iters, nodes)
    wait_for(log, f"iter 3/{iters}")
    c.run(["scancel", *scancel, job], check=True)
    wait_for(log, "requeueing", what="the batch script's requeue on exit 75")
    # SLURM holds a requeued job back until its old credential expires (cred_expire, 5 s here
    # instead of 120 s: a rerun on the same node before that is refused, "credential revoked")
    assert wait_done(c, job, log) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert f"stopped by {sig} at iteration" in text and "attempt 1" in text and "resumed from" in text
    assert "Traceback" not in text
    return text


def test_a_preempted_sbatch_job_requeues_itself_and_finishes_like_an_unpreempted_one(slurm, tiny_shards, tmp_path):
    iters = 30
    straight_log = tmp_path / "straight.out"
    job = _submit(slurm, tmp_path / "straight", straight_log, tiny_shards, iters)
    assert wait_done(slurm, job, straight_log) == "COMPLETED", straight_log.read_text()[-3000:]
    _preempt_and_finish(slurm, tiny_shards, tmp_path, iters, nodes=1)
    a, b = _student(tmp_path / "straight", iters), _student(tmp_path / "preempted", iters)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("scancel", [["--signal=TERM"], ["--batch", "--signal=TERM"]], ids=["tasks", "batch_script"])
def test_sigterm_to_the_tasks_or_to_the_batch_script_checkpoints_and_requeues(slurm, tiny_shards, tmp_path, scancel):
    """The batch script traps SIGTERM (its default would end the job and kill the tasks before
    their checkpoint) and passes it to the tasks through slurmctld."""
    text = _preempt_and_finish(slurm, tiny_shards, tmp_path, 30, nodes=1, scancel=scancel, sig="SIGTERM")
    if "--batch" in scancel:
        assert "SIGTERM received by the batch script; passed to the tasks" in text


@pytest.fixture(scope="module")
def slurm_two_nodes(tmp_path_factory):
    yield from _cluster(tmp_path_factory, 2)


def test_two_node_sbatch_job_preempted_and_requeued_finishes_like_two_ranks_on_one_node(slurm_two_nodes, tiny_shards,
                                                                                        tmp_path):
    """Two slurmd "nodes" in network namespaces, one task each: the job's ranks meet at the
    first node's address (from the node list), are preempted, requeue, resume and end with the
    weights of an uninterrupted 2-rank run on one node (torchrun, no SLURM)."""
    iters = 30
    one = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), str(CONFIG),
                          *_overrides(tiny_shards, tmp_path / "one", iters)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", NPROC="2", MAX_RESTARTS="0",
                                               PYTHON=sys.executable, MASTER_PORT=str(free_port()), RUN_ID="one",
                                               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"))
    assert one.returncode == 0, one.stderr[-3000:]
    text = _preempt_and_finish(slurm_two_nodes, tiny_shards, tmp_path, iters, nodes=2)
    assert "on enode1,enode2" in text and "2 rank(s), gloo on cpu" in text
    a, b = _student(tmp_path / "one", iters), _student(tmp_path / "preempted", iters)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
