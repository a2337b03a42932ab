"""Real SLURM on this machine: munge, slurmctld and slurmd started by the fixture (installed
from Debian's packages if missing), `launch/slurm/train.sbatch` submitted with the tiny
config, preempted with SIGUSR1 mid-run, requeued by the script, and finished by the rerun with
the same final weights as a job that was never interrupted. Skipped, with the reason printed,
only where the daemons cannot run (not root, no packages)."""
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from eglp_dist.config import PACKAGE_CONFIG_ROOT

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]

pytestmark = pytest.mark.slow  # starts daemons and runs two jobs: `make test-all` (CI)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _have_slurm() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))


def _install() -> str:
    """'' when the daemons are there (installed now if needed), else why not."""
    if os.geteuid() != 0:
        return "not root: cannot start munge/slurmctld/slurmd"
    if _have_slurm():
        return ""
    if not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it"
    proc = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if proc.returncode != 0:
        proc = subprocess.run("apt-get update -q && apt-get install -y --no-install-recommends " + " ".join(PACKAGES),
                              shell=True, capture_output=True, text=True, timeout=900,
                              env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    return "" if proc.returncode == 0 and _have_slurm() else f"cannot install SLURM: {proc.stderr.strip()[-300:]}"


def _munge_ok() -> bool:
    enc = subprocess.run(["munge", "-n"], capture_output=True)
    return enc.returncode == 0 and subprocess.run(["unmunge"], input=enc.stdout, capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = _install()
    if why:
        print(f"SKIP real-SLURM test: {why}")
        pytest.skip(why)
    base = tmp_path_factory.mktemp("slurm")
    for d in ("spool_ctld", "spool_d", "log", "run"):
        (base / d).mkdir()
    started = []
    if not _munge_ok():
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
        started.append(Path("/run/munge/munged.pid"))
        deadline = time.time() + 10
        while not _munge_ok():
            assert time.time() < deadline, "munged did not come up"
            time.sleep(0.2)
    conf = base / "slurm.conf"
    conf.write_text(f"""ClusterName=eglptest
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
JobRequeue=1
ReturnToService=2
SlurmUser=root
StateSaveLocation={base / 'spool_ctld'}
SlurmdSpoolDir={base / 'spool_d'}
SlurmctldPidFile={base / 'run' / 'slurmctld.pid'}
SlurmdPidFile={base / 'run' / 'slurmd.pid'}
SlurmctldLogFile={base / 'log' / 'slurmctld.log'}
SlurmdLogFile={base / 'log' / 'slurmd.log'}
MpiDefault=none
NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 2} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
    env = dict(os.environ, SLURM_CONF=str(conf))
    try:
        why = ""
        try:
            subprocess.run(["slurmctld", "-i", "-f", str(conf)], env=env, check=True, capture_output=True)
            started.append(base / "run" / "slurmctld.pid")
            subprocess.run(["slurmd", "-N", "localhost", "-f", str(conf)], env=env, check=True, capture_output=True)
            started.append(base / "run" / "slurmd.pid")
            deadline = time.time() + 30
            while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                                               text=True).stdout:
                if time.time() > deadline:
                    raise RuntimeError("the node never became idle")
                time.sleep(0.3)
        except (subprocess.CalledProcessError, RuntimeError) as exc:  # e.g. no cgroup file system
            logs = " | ".join(p.read_text()[-300:] for p in (base / "log").glob("*.log"))
            why = f"SLURM daemons cannot start here: {exc} {getattr(exc, 'stderr', b'') or ''} {logs}"
        if why:
            print(f"SKIP real-SLURM test: {why}")
            pytest.skip(why)
        yield env
    finally:  # stop what we started, by PID, whatever happened
        for pid_file in reversed(started):
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        time.sleep(1)


@pytest.fixture
def shards(tiny_shards):
    return tiny_shards


def _submit(env, out: Path, log: Path, shards, iters: int) -> str:
    cmd = ["sbatch", "--parsable", "--ntasks-per-node", "2", "--gpus-per-node", "0", "--cpus-per-task", "1",
           "--time", "20", "--output", str(log), "--export", "ALL,OMP_NUM_THREADS=1",
           str(ROOT / "launch" / "slurm" / "train.sbatch"), str(PACKAGE_CONFIG_ROOT / "demo" / "tiny_source_only.yaml"),
           f"run.out_dir={out}", f"data.source.shards={shards['cityscapes_train']}", "data.source.crop_size=[64,64]",
           f"trainer.max_iters={iters}", "trainer.ckpt_interval=1000", "trainer.log_interval=1",
           "trainer.image_interval=1000", "schedule.warmup_iters=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(env, PY=str(Path(os.sys.executable))), capture_output=True,
                          text=True, check=True)
    return proc.stdout.strip().split(";")[0]


def _job_state(env, job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "GONE")


def _wait_done(env, job: str, log: Path, timeout=300):
    deadline = time.time() + timeout
    while _job_state(env, job) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE"):
        assert time.time() < deadline, log.read_text()[-3000:] if log.exists() else "no log"
        time.sleep(0.5)
    return _job_state(env, job)


def _student(run: Path, it: int):
    from eglp_dist.dist.engine import export_fp32

    return export_fp32(run / "demo_source_only" / "checkpoints" / f"iter_{it:07d}" / "engines" / "student")


def test_a_preempted_sbatch_job_requeues_itself_and_finishes_like_an_unpreempted_one(slurm, shards, tmp_path):
    iters = 30
    straight_log = tmp_path / "straight.out"
    job = _submit(slurm, tmp_path / "straight", straight_log, shards, iters)
    assert _wait_done(slurm, job, straight_log) == "COMPLETED", straight_log.read_text()[-3000:]

    log = tmp_path / "preempted.out"
    job = _submit(slurm, tmp_path / "preempted", log, shards, iters)
    deadline = time.time() + 240
    while not (log.exists() and "iter 3/30" in log.read_text()):
        assert time.time() < deadline, log.read_text()[-3000:] if log.exists() else "no log"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)  # reaches the tasks
    deadline = time.time() + 240
    while "requeueing" not in log.read_text():  # the batch script saw exit 75 and requeued
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)
    # SLURM holds a requeued job back until its old credential expires (cred_expire, 5 s here
    # instead of 120 s: a rerun on the same node before that is refused, "credential revoked")
    assert _wait_done(slurm, job, log) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert "stopped by SIGUSR1 at iteration" in text and "attempt 1" in text and "resumed from" in text
    a, b = _student(tmp_path / "straight", iters), _student(tmp_path / "preempted", iters)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
