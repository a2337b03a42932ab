"""Two nodes on one machine: two network namespaces joined by a veth pair, one
`launch/torchrun.sh` per "node" (c10d rendezvous, 1 rank each), the tiny config to the end,
with the same final weights as 2 ranks on one node. Namespaces and processes are removed
whatever happens; skipped, with the reason printed, where namespaces cannot be made."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_harness import tiny_train_args
from eglp_dist.runtime.env import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo/tiny_source_only.yaml"
pytestmark = pytest.mark.slow  # two 2-rank trainings across namespaces: `make test-all` (CI)


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def two_nodes():
    if os.geteuid() != 0 or not shutil.which("ip"):
        reason = "not root or no `ip`: cannot make network namespaces"
        print(f"SKIP two-node test: {reason}")
        pytest.skip(reason)
    tag = f"e{os.getpid() % 100000}"
    names = [f"{tag}n1", f"{tag}n2"]
    veths = [f"{tag}v1", f"{tag}v2"]
    try:
        for n in names:
            _ip("netns", "add", n)
        _ip("link", "add", veths[0], "type", "veth", "peer", "name", veths[1])
        for i, (n, v) in enumerate(zip(names, veths), start=1):
            _ip("link", "set", v, "netns", n)
            _ip("netns", "exec", n, "ip", "addr", "add", f"10.200.0.{i}/24", "dev", v)
            _ip("netns", "exec", n, "ip", "link", "set", v, "up")
            _ip("netns", "exec", n, "ip", "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        for n in names:
            _ip("netns", "del", n, check=False)
        reason = f"cannot make network namespaces: {exc.stderr.strip()}"
        print(f"SKIP two-node test: {reason}")
        pytest.skip(reason)
    try:
        yield list(zip(names, veths, ["10.200.0.1", "10.200.0.2"]))
    finally:
        for n in names:  # the veth pair goes with its namespaces
            _ip("netns", "del", n, check=False)


def _args(tiny_shards, out):
    return tiny_train_args(tiny_shards, out, "trainer.max_iters=4")


def _env(**extra):
    venv_bin = str(Path(sys.executable).parent)
    return dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{venv_bin}:{os.environ['PATH']}", PYTHON=sys.executable,
                MAX_RESTARTS="0", **extra)


def _student(run: Path):
    from eglp_dist.runtime.engines import export_fp32

    return export_fp32(run / "demo_source_only" / "checkpoints" / "iter_0000004" / "engines" / "student")


def test_two_nodes_in_network_namespaces_train_like_two_ranks_on_one_node(two_nodes, tiny_shards, tmp_path):
    script = str(ROOT / "launch" / "torchrun.sh")
    one = subprocess.run(["bash", script, CONFIG, *_args(tiny_shards, tmp_path / "one")], cwd=ROOT,
                         env=_env(NPROC="2", MASTER_PORT=str(free_port()), RUN_ID="one"),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    port, procs = str(free_port()), []
    try:
        for i, (ns, veth, addr) in enumerate(two_nodes):
            env = _env(NNODES="2", NPROC="1", MASTER_ADDR="10.200.0.1", MASTER_PORT=port, RUN_ID="two",
                       LOCAL_ADDR=addr, GLOO_SOCKET_IFNAME=veth, RDZV_CONF=f"is_host={int(i == 0)}")
            log = open(tmp_path / f"node{i}.log", "w")
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, "bash", script, CONFIG,
                                           *_args(tiny_shards, tmp_path / "two")],  # one file system, as a cluster's
                                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.time() + 300
        codes = [p.wait(timeout=max(1, deadline - time.time())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = (tmp_path / "node0.log").read_text()
    assert codes == [0, 0], text[-3000:] + (tmp_path / "node1.log").read_text()[-2000:]
    assert "2 rank(s), gloo on cpu" in text
    a, b = _student(tmp_path / "one"), _student(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
