"""Launcher detection (pure) and real 2-process groups started the way each launcher does."""
import pytest

from dist_harness import run_ranks
from eglp_dist.runtime.env import DistEnv, detect_env, expand_slurm_nodelist


def test_plain_process_is_single_rank():
    env = detect_env(environ={})
    assert env == DistEnv() and env.world_size == 1 and env.launcher == "none"


def test_torchrun_variables():
    env = detect_env(environ={"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                              "GROUP_RANK": "0", "TORCHELASTIC_RUN_ID": "x", "MASTER_ADDR": "n1",
                              "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 16, 1, 8)
    assert (env.master_addr, env.master_port, env.launcher, env.node_rank) == ("n1", 1234, "torchrun", 0)


def test_deepspeed_launcher_variables_and_local_rank_argument():
    env = detect_env(environ={"RANK": "3", "WORLD_SIZE": "4", "CROSS_RANK": "1", "LOCAL_SIZE": "2",
                              "MASTER_ADDR": "h", "MASTER_PORT": "29501"}, local_rank_arg=1)
    assert (env.rank, env.local_rank, env.local_world_size, env.launcher) == (3, 1, 2, "deepspeed")


def test_slurm_variables_master_from_nodelist_port_from_job_id():
    env = detect_env(environ={"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                              "SLURM_JOB_NODELIST": "gpu[007-008],big1", "SLURM_TASKS_PER_NODE": "8(x2)",
                              "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (9, 16, 1, 8)
    assert env.master_addr == "gpu007" and env.master_port == 15000 + 123456 % 20000
    assert env.launcher == "slurm" and env.node_rank == 1


def test_torchrun_inside_slurm_wins():
    env = detect_env(environ={"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "RANK": "3", "WORLD_SIZE": "8",
                              "TORCHELASTIC_RUN_ID": "1", "LOCAL_RANK": "3"})
    assert env.rank == 3 and env.world_size == 8 and env.launcher == "torchrun"


@pytest.mark.parametrize("nodelist,hosts", [
    ("node1", ["node1"]),
    ("a[1-3]", ["a1", "a2", "a3"]),
    ("gpu[09-11,20],cpu7", ["gpu09", "gpu10", "gpu11", "gpu20", "cpu7"]),
])
def test_expand_slurm_nodelist(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts


def test_bad_variable_names_the_variable():
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        detect_env(environ={"RANK": "0", "WORLD_SIZE": "two"})


def _whoami(env):
    from eglp_dist.runtime import comm
    import torch

    total = comm.all_reduce_sum(torch.tensor([env.rank + 1]))
    return env.rank, env.world_size, env.local_rank, env.launcher, int(total)


@pytest.mark.parametrize("style", ["torchrun", "deepspeed", "slurm"])
def test_two_real_ranks_join_for_each_launcher(style):
    results = run_ranks(_whoami, 2, style=style)
    assert [r[:3] for r in results] == [(0, 2, 0), (1, 2, 1)]
    assert {r[3] for r in results} == {style}
    assert [r[4] for r in results] == [3, 3]  # 1 + 2 summed on both ranks
