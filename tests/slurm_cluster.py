"""A real SLURM cluster for the tests, started and stopped by them: munge, slurmctld and one
slurmd per node, from Debian's packages (installed if missing). One node runs on the host's
network; two nodes run in network namespaces joined by a veth pair (10.200.0.1 / .2), each
daemon in its namespace, with a hosts file of the node names bind-mounted in its own mount
namespace (``ip netns exec`` would remount /sys and hide the cgroup file system slurmd needs,
so it is ``nsenter --net`` + ``unshare -m``). Everything is removed whatever happens; where
the daemons cannot run, ``why`` says so and the tests skip with that reason."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
IFNAME = "eglp0"  # both ends of the veth pair get this name inside their namespace (GLOO_SOCKET_IFNAME)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _have_slurm() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))


def install() -> str:
    """'' when the daemons are there (installed now if needed), else why not."""
    if os.geteuid() != 0:
        return "not root: cannot start munge/slurmctld/slurmd"
    if _have_slurm():
        return ""
    if not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
                          capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0:
        proc = subprocess.run("apt-get update -q && apt-get install -y --no-install-recommends " + " ".join(PACKAGES),
                              shell=True, capture_output=True, text=True, timeout=900, env=env)
    return "" if proc.returncode == 0 and _have_slurm() else f"cannot install SLURM: {proc.stderr.strip()[-300:]}"


def _munge_ok() -> bool:
    enc = subprocess.run(["munge", "-n"], capture_output=True)
    return enc.returncode == 0 and subprocess.run(["unmunge"], input=enc.stdout, capture_output=True).returncode == 0


class Cluster:
    """``run(cmd)`` runs a SLURM client command where slurmctld is reachable (in the first
    node's namespace when there are two)."""

    def __init__(self, env: Dict[str, str], prefix: List[str], nodes: List[str]):
        self.env, self.prefix, self.nodes = env, prefix, nodes

    def run(self, cmd: List[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.prefix + cmd, env=kwargs.pop("env", self.env), capture_output=True, text=True,
                              **kwargs)


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@contextlib.contextmanager
def _namespaces(tag: str, n: int) -> Iterator[List[str]]:
    names = [f"{tag}n{i + 1}" for i in range(n)]
    try:
        for name in names:
            _ip("netns", "add", name)
        _ip("link", "add", f"{tag}v1", "type", "veth", "peer", "name", f"{tag}v2")
        for i, name in enumerate(names, start=1):
            _ip("link", "set", f"{tag}v{i}", "netns", name)
            _ip("-n", name, "link", "set", f"{tag}v{i}", "name", IFNAME)
            _ip("-n", name, "addr", "add", f"10.200.0.{i}/24", "dev", IFNAME)
            _ip("-n", name, "link", "set", IFNAME, "up")
            _ip("-n", name, "link", "set", "lo", "up")
        yield names
    finally:
        for name in names:  # the veth pair goes with its namespaces
            _ip("netns", "del", name, check=False)


@contextlib.contextmanager
def cluster(base: Path, nodes: int = 1) -> Iterator[tuple]:
    """(Cluster or None, why not). ``nodes`` 1 (host network) or 2 (two namespaces)."""
    why = install()
    if why:
        yield None, why
        return
    if nodes > 1 and not shutil.which("nsenter"):
        yield None, "no nsenter: cannot start a daemon in a network namespace"
        return
    for d in ("spool_ctld", "log", "run"):
        (base / d).mkdir(parents=True, exist_ok=True)
    started: List[Path] = []
    with contextlib.ExitStack() as stack:
        try:
            if nodes > 1:
                try:
                    netns = stack.enter_context(_namespaces(f"s{os.getpid() % 100000}", nodes))
                except subprocess.CalledProcessError as exc:
                    raise RuntimeError(f"cannot make network namespaces: {exc.stderr.strip()}") from None
                names = [f"enode{i + 1}" for i in range(nodes)]
                addrs = [f"10.200.0.{i + 1}" for i in range(nodes)]
                hosts = base / "hosts"
                hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in zip(addrs, names)))
                # each daemon in its node's network namespace and a mount namespace of its own
                # with the cluster's hosts file (tasks inherit both from their slurmd)
                wraps = [["nsenter", f"--net=/run/netns/{ns}", "unshare", "-m", "sh", "-c",
                          f'mount --bind "{hosts}" /etc/hosts && exec "$0" "$@"'] for ns in netns]
            else:
                names, addrs, wraps = ["localhost"], ["127.0.0.1"], [[]]
            if not _munge_ok():
                Path("/run/munge").mkdir(parents=True, exist_ok=True)
                shutil.chown("/run/munge", "munge", "munge")
                subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
                started.append(Path("/run/munge/munged.pid"))
                deadline = time.time() + 10
                while not _munge_ok():
                    if time.time() > deadline:
                        raise RuntimeError("munged did not come up")
                    time.sleep(0.2)
            cpus = max(1, (os.cpu_count() or 2) // nodes)
            # slurmctld checks that SlurmctldHost names the host it runs on (so the real host
            # name); the address in brackets is where the nodes reach it
            ctld = socket.gethostname() if nodes > 1 else "localhost"
            conf = base / "slurm.conf"
            conf.write_text(f"""ClusterName=eglptest
SlurmctldHost={ctld}({addrs[0]})
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
SlurmdSpoolDir={base / 'spool_%n'}
SlurmctldPidFile={base / 'run' / 'slurmctld.pid'}
SlurmdPidFile={base / 'run' / 'slurmd_%n.pid'}
SlurmctldLogFile={base / 'log' / 'slurmctld.log'}
SlurmdLogFile={base / 'log' / 'slurmd_%n.log'}
MpiDefault=none
""" + "".join(f"NodeName={n} NodeAddr={a} CPUs={cpus} RealMemory=4000 State=UNKNOWN\n" for n, a in zip(names, addrs))
                            + f"PartitionName=debug Nodes={','.join(names)} Default=YES MaxTime=INFINITE State=UP\n")
            for n in names:
                (base / f"spool_{n}").mkdir(exist_ok=True)
            env = dict(os.environ, SLURM_CONF=str(conf))
            subprocess.run(wraps[0] + ["slurmctld", "-i", "-f", str(conf)], env=env, check=True, capture_output=True)
            started.append(base / "run" / "slurmctld.pid")
            for n, wrap in zip(names, wraps):
                subprocess.run(wrap + ["slurmd", "-N", n, "-f", str(conf)], env=env, check=True, capture_output=True)
                started.append(base / "run" / f"slurmd_{n}.pid")
            c = Cluster(env, wraps[0], names)
            deadline = time.time() + 30
            while c.run(["sinfo", "-h", "-N", "-o", "%T"]).stdout.split().count("idle") < nodes:
                if time.time() > deadline:
                    raise RuntimeError("the nodes never became idle: " + c.run(["sinfo", "-N"]).stdout)
                time.sleep(0.3)
        except (subprocess.CalledProcessError, RuntimeError) as exc:  # e.g. no cgroup file system
            logs = " | ".join(p.read_text()[-300:] for p in (base / "log").glob("*.log"))
            why = f"SLURM daemons cannot start here: {exc} {getattr(exc, 'stderr', b'') or ''} {logs}"
            _stop(started)
            started.clear()
            c = None
        try:
            yield c, why
        finally:  # stop what we started, by PID, whatever happened
            _stop(started)


def _stop(pid_files: List[Path]) -> None:
    for pid_file in reversed(pid_files):
        try:
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        except (OSError, ValueError):
            pass
    time.sleep(1)


def job_state(c: Cluster, job: str) -> str:
    out = c.run(["scontrol", "show", "job", job]).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "GONE")


def wait_done(c: Cluster, job: str, log: Path, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while job_state(c, job) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE"):
        if time.time() > deadline:
            raise AssertionError(log.read_text()[-3000:] if log.exists() else "no log")
        time.sleep(0.5)
    return job_state(c, job)


def wait_for(log: Path, text: str, timeout: float = 240, what: Optional[str] = None) -> None:
    deadline = time.time() + timeout
    while not (log.exists() and text in log.read_text()):
        if time.time() > deadline:
            raise AssertionError(f"{what or text!r} not seen: " + (log.read_text()[-3000:] if log.exists() else "no log"))
        time.sleep(0.2)
