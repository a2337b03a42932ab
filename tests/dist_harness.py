"""The tests' multi-process harness: :mod:`eglp_dist.dist.spawn` (real gloo ranks, as a
launcher starts them) and a training worker."""
from eglp_dist.dist.spawn import launcher_environ, run_ranks, slurm_port  # noqa: F401


def train_worker(env, config, overrides):
    """A worker for run_ranks: `eglp train CONFIG OVERRIDES` on this rank."""
    from eglp_dist.config import load_config
    from eglp_dist.train import train

    return train(load_config(config, overrides))
