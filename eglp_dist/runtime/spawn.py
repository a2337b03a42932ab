"""Run a function on N real local processes joined by a gloo process group, as torchrun,
the DeepSpeed launcher or srun would start them: the multi-rank benchmarks (``tools/``) and
the tests use it, so it ships with the package.

Worker functions must live at module level in an importable module (spawned processes
import them by name). Each worker gets its DistEnv and returns a picklable result; results
come back in rank order through files, so a failing rank's traceback reaches the caller.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import torch.multiprocessing as mp

from eglp_dist.runtime.env import free_port


def launcher_environ(style: str, rank: int, world: int, port: int) -> Dict[str, str]:
    """The variables each launcher sets for one process on one node."""
    if style == "torchrun":
        return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "test"}
    if style == "deepspeed":  # deepspeed/launcher/launch.py, plus --local_rank=N on argv
        return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                "LOCAL_SIZE": str(world), "CROSS_RANK": "0", "CROSS_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if style == "slurm":  # srun --ntasks=world on one node; port derived from the job id
        return {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world), "SLURM_LOCALID": str(rank),
                "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_TASKS_PER_NODE": f"{world}(x1)",
                "SLURM_JOB_ID": str(port - 15000)}
    raise ValueError(style)


def _entry(rank: int, fn: Callable, world: int, port: int, args: Sequence[Any], out_dir: str,
           style: str, backend: str = "gloo") -> None:
    for key in [k for k in os.environ if k.startswith("SLURM_")] + ["RANK", "WORLD_SIZE", "MASTER_PORT"]:
        os.environ.pop(key, None)
    os.environ.update(launcher_environ(style, rank, world, port))
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from eglp_dist.runtime.env import detect_env, exit_without_finalizers, init_distributed, shutdown

    env = detect_env(local_rank_arg=rank if style == "deepspeed" else None)
    init_distributed(env, backend=backend, timeout_s=120)
    try:
        result = fn(env, *args)
        payload = ("ok", result)
    except BaseException:  # noqa: BLE001 - shipped to the parent
        payload = ("error", traceback.format_exc())
    finally:
        shutdown()
    with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(payload, f)
    exit_without_finalizers(0)


def slurm_port() -> int:
    """A free port in the range SLURM-style port derivation (15000 + job id % 20000) covers."""
    for port in range(25000, 35000, 7):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 25000-35000")


def run_ranks(fn: Callable, world_size: int = 2, args: Sequence[Any] = (), style: str = "torchrun",
              backend: str = "gloo") -> List[Any]:
    """``fn(env, *args)`` on ``world_size`` fresh processes forming one group (``backend``:
    gloo, or nccl / auto where GPUs are); the list of their results, rank order."""
    port = slurm_port() if style == "slurm" else free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(fn, world_size, port, tuple(args), out_dir, style, backend),
                           nprocs=world_size, start_method="spawn", join=True)
        results = []
        for r in range(world_size):
            with open(Path(out_dir) / f"rank{r}.pkl", "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise AssertionError(f"rank {r} failed:\n{value}")
            results.append(value)
        return results
