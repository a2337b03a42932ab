"""Training streams and evaluation loaders: the data API of the training loop.

    stream = build_train_stream(cfg.data.source, cfg.data, rank, world_size, seed, device)
    batch = next(stream)          # {"img": [B,3,H,W] float32, "seg": [B,H,W] int64, "meta": [...]}
    state = stream.state_dict()   # -> checkpoint; stream.load_state_dict(state) resumes exactly

    for batch in build_eval_loader(cfg.data.val.NAME, cfg.data, rank, world_size, device): ...

Training is iteration based and each batch is a pure function of (seed, stream, rank, step):
the sampler picks sample indices from the manifest (uniform / rare class / class-uniform),
``ShardReader`` fetches their bytes by .idx offset, the augmenter draws the geometry from an
RNG seeded by (seed, stream, rank, step, slot), and a backend (PIL threads or DALI) decodes
and resamples the images. Hence: every rank yields a batch on every step forever (no DDP
hang on uneven shards), resume needs only the step counter, and prefetching ahead in threads
cannot change what is produced.

Evaluation visits every sample exactly once across ranks: rank r reads the contiguous part
``shards.eval_range(N, r, world)`` (DALI's ``readers.webdataset`` sharding with
``shard_id=rank``); ranks may differ by one sample, so the evaluator must not run a collective
per batch (reduce the confusion matrix once at the end).
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from eglp_dist.data import dali, pil
from eglp_dist.data.config import backend_of, check_data_config, check_eval_stream, check_stream
from eglp_dist.data.planning import SampleSource, open_stream_shards
from eglp_dist.data.shards import SEG_EXT, eval_range
from eglp_dist.notices import warning


def _stream_name(stream_cfg, data_cfg) -> str:
    """The dotted name under ``data`` of a stream block (``source``, ``val.NAME``, ``test``)."""
    for name in ("source", "target", "prompt", "test"):
        if getattr(data_cfg, name, None) is stream_cfg:
            return name
    for name, target in getattr(data_cfg, "val", {}).items():
        if target is stream_cfg:
            return f"val.{name}"
    return str(stream_cfg.shards)


class TrainStream:
    """Infinite iterator of training batches of one stream on one rank; exact resume.

    ``state_dict()`` holds the number of batches consumed (and what they depend on);
    ``load_state_dict()`` continues with exactly the batches an uninterrupted run would have
    produced next, provided seed, world size and batch size are unchanged (else a warning).
    """

    def __init__(self, name: str, stream_cfg, data_cfg, rank: int, world_size: int, seed: int,
                 device, ground_truth: bool = False):
        check_stream(stream_cfg, f"data.{name}")
        self.name, self.rank, self.world_size = name, rank, world_size
        self.device = torch.device(device)
        self.stream_cfg, self.data_cfg = stream_cfg, data_cfg
        self.source = SampleSource(name, stream_cfg, rank, world_size, seed, data_cfg.resample, ground_truth)
        self.backend = backend_of(data_cfg)
        self.step = 0
        self._producer = None
        # seconds a batch may take before planning.StalledStream (None: wait forever); the
        # training loop sets dist.step_timeout_s
        self.wait_timeout: Optional[float] = None

    # -- iteration ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self._producer is None:
            self._producer = self._make_producer(self.step)
        batch = self._producer.get(self.step)
        self.step += 1
        return batch

    def _make_producer(self, start: int):
        producer = dali.DaliTrainProducer if self.backend == "dali" else pil.PilTrainProducer
        return producer(self.source, self.data_cfg, start, self.device, self.wait_timeout)

    @property
    def num_samples(self) -> int:
        return len(self.source.manifest)

    @property
    def batch_size(self) -> int:
        return self.source.batch_size

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.source.seed, "stream": self.name,
                "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        changed = [f"{key}={mine} (checkpoint: {state[key]})"
                   for key, mine in (("world_size", self.world_size), ("batch_size", self.batch_size),
                                     ("num_samples", self.num_samples), ("seed", self.source.seed))
                   if state.get(key, mine) != mine]
        if changed:
            warning(f"data stream {self.name!r} resumes with {', '.join(changed)}; its batches "
                    f"differ from the uninterrupted run's")
        self.close()
        self.step = int(state["step"])

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()
            self._producer = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def build_train_stream(stream_cfg, data_cfg, rank: int = 0, world_size: int = 1,
                       seed: Optional[int] = None, device="cpu", name: Optional[str] = None,
                       ground_truth: bool = False) -> TrainStream:
    """An infinite, exactly resumable stream of augmented batches for one rank.

    ``stream_cfg`` is one of ``data_cfg.source/target/prompt`` (its name is found by
    identity, or pass ``name``); ``seed`` defaults to ``data_cfg.seed``. ``ground_truth``:
    an unlabelled stream's labels on the batch as ``gt``, for diagnostics (``SampleSource``).
    """
    check_data_config(data_cfg)
    name = name or _stream_name(stream_cfg, data_cfg)
    return TrainStream(name, stream_cfg, data_cfg, rank, world_size,
                       data_cfg.seed if seed is None else seed, device, ground_truth)


class EvalLoader:
    """Every sample of a split exactly once across ranks, full images (resized to img_scale,
    keep ratio, no crop/flip), batch size 1.

    Batch: ``img`` [1,3,h,w] float32 normalised; ``seg`` [1,H,W] int64 trainIds at the
    *original* resolution (MMSeg evaluates there: upsample logits to seg's size), present when
    the split is labelled and ``with_labels``; ``meta`` [dict] with key, source (path relative
    to the dataset root, for naming predictions), dataset, split, index, ori_shape, img_shape.
    """

    def __init__(self, name: str, stream_cfg, data_cfg, rank: int, world_size: int, device):
        check_eval_stream(stream_cfg, f"data.{name}")
        self.name, self.rank, self.world_size = name, rank, world_size
        # opened (validated) now, though read sequentially later: see shards.open_shards
        reader = open_stream_shards(name, stream_cfg)
        self.manifest = reader.manifest
        self.with_labels = bool(stream_cfg.with_labels) and self.manifest.labelled
        if self.with_labels:
            reader.require(SEG_EXT)
        reader.close()
        self.indices = eval_range(len(self.manifest), rank, world_size)
        self.img_scale = list(stream_cfg.img_scale) if stream_cfg.img_scale is not None else None
        self.class_sets = list(stream_cfg.class_sets)  # which mIoUs the evaluation reports
        self.data_cfg, self.device = data_cfg, torch.device(device)
        self.backend = backend_of(data_cfg)
        self.resample = data_cfg.resample

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[dict]:
        if not len(self.indices):
            return iter(())
        return dali.iter_eval_dali(self) if self.backend == "dali" else pil.iter_eval_pil(self)

    def meta(self, index: int, json_meta: dict, img_hw) -> dict:
        w, h = json_meta["size"]
        return {**json_meta, "index": index, "ori_shape": [h, w], "img_shape": list(img_hw)}


def build_eval_loader(stream_cfg, data_cfg, rank: int = 0, world_size: int = 1, device="cpu",
                      name: Optional[str] = None) -> EvalLoader:
    """A loader over this rank's share of a split (a ``data_cfg.val`` target or
    ``data_cfg.test``); ``name`` (default: found by identity) is its dotted key under data."""
    check_data_config(data_cfg)
    return EvalLoader(name or _stream_name(stream_cfg, data_cfg), stream_cfg, data_cfg, rank,
                      world_size, device)
