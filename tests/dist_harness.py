"""The tests' multi-process harness: :mod:`eglp_dist.runtime.spawn` (real gloo ranks, as a
launcher starts them) and a training worker."""
from eglp_dist.runtime.spawn import launcher_environ, run_ranks, slurm_port  # noqa: F401


def train_worker(env, config, overrides):
    """A worker for run_ranks: `eglp train CONFIG OVERRIDES` on this rank."""
    from eglp_dist.config import load_config
    from eglp_dist.train import train

    return train(load_config(config, overrides))


def train_with_method(config, overrides, catch=()):
    """`eglp train CONFIG OVERRIDES` on this rank, keeping the method the loop built, for a
    worker to report on (its engines, generator, counters): (method, error text or None),
    the error being one of ``catch`` raised by the run."""
    import eglp_dist.train as T
    from eglp_dist.config import load_config

    kept = {}
    build = T.build_method

    def keep(*args, **kwargs):
        kept["method"] = build(*args, **kwargs)
        return kept["method"]

    T.build_method = keep
    try:
        T.train(load_config(config, overrides))
        error = None
    except tuple(catch) as exc:
        error = str(exc)
    finally:
        T.build_method = build
    return kept.get("method"), error


def tiny_train_args(shards, out, *extra):
    """Overrides of configs/demo/tiny_source_only.yaml for the short multi-process runs:
    the tiny shards, 64-pixel crops, a log line per iteration, no pictures, no evaluation
    (a test that evaluates gives data.val shards and trainer.eval_interval)."""
    return [f"run.out_dir={out}", f"data.source.shards={shards['cityscapes_train']}", "data.source.crop_size=[64,64]",
            "trainer.log_interval=1", "trainer.image_interval=1000", "schedule.warmup_iters=2",
            "trainer.eval_interval=0", *extra]
