"""Data engine: labels, dataset layouts, synthetic scenes, shard packing, loaders, sampling.

The training loop needs only (see docs/data.md):

    from eglp_dist.data import DataConfig, build_train_stream, build_eval_loader
    from eglp_dist.data.labels import NUM_CLASSES, IGNORE_INDEX, CLASSES, PALETTE

Loader symbols are imported lazily, so ``eglp synth``/``eglp pack`` never import DALI.
"""
from eglp_dist.data.config import DataConfig, SamplingConfig, StreamConfig  # noqa: F401

_LAZY = {"build_train_stream": "eglp_dist.data.loader", "build_eval_loader": "eglp_dist.data.loader",
         "TrainStream": "eglp_dist.data.loader", "EvalLoader": "eglp_dist.data.loader"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'eglp_dist.data' has no attribute {name!r}")
