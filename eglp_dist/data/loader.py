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

import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Sequence

import numpy as np
import torch

from eglp_dist.data.augment import Augmenter, Geometry
from eglp_dist.data.codecs import BadSample, decode_seg
from eglp_dist.data.config import check_data_config, check_eval_stream, check_stream, shard_folders
from eglp_dist.data.sampling import Pick, build_sampler, min_class_pixels
from eglp_dist.data.shards import SEG_EXT, eval_range, image_ext, open_shards
from eglp_dist.errors import ConfigError, DataError


@dataclass
class Planned:
    """One training sample, decided but not decoded: image bytes + geometry + label crop."""

    image: bytes
    geom: Geometry
    seg: Optional[np.ndarray]  # uint8 [pad_hw], flipped and padded (None if unlabelled)
    meta: dict
    origin: str  # '<shard>:<key>.<ext>' of the image, named by decode errors


def stream_salt(name: str) -> int:
    """A per-stream constant mixed into every seed, so source and target draw differently."""
    return zlib.crc32(name.encode())


def _stream_name(stream_cfg, data_cfg) -> str:
    """The dotted name under ``data`` of a stream block (``source``, ``val.NAME``, ``test``)."""
    for name in ("source", "target", "prompt", "test"):
        if getattr(data_cfg, name, None) is stream_cfg:
            return name
    for name, target in getattr(data_cfg, "val", {}).items():
        if target is stream_cfg:
            return f"val.{name}"
    return str(stream_cfg.shards)


def open_stream_shards(name: str, stream_cfg):
    """A stream's shard folders opened and validated (``shards.open_shards``)."""
    folders = shard_folders(stream_cfg.shards, f"data.{name}.shards")
    if not folders:
        raise ConfigError(f"data.{name}.shards: no shard folder set for stream {name!r}")
    return open_shards(folders)


class SampleSource:
    """Decides training sample (step, slot) of one rank: pick, read, label crop, geometry."""

    def __init__(self, name: str, stream_cfg, rank: int, world_size: int, seed: int,
                 resample: str = "mmcv"):
        self.reader = open_stream_shards(name, stream_cfg)
        self.manifest = self.reader.manifest
        self.with_labels = bool(stream_cfg.with_labels)
        if self.with_labels and not self.manifest.labelled:
            raise ConfigError(f"data.{name}.with_labels: {stream_cfg.shards} has no labels "
                              f"(packed from an unlabelled split); set with_labels=false")
        if self.with_labels:
            self.reader.require(SEG_EXT)
        self.name, self.rank, self.seed, self.salt = name, rank, seed, stream_salt(name)
        self.batch_size = int(stream_cfg.batch_size)
        self.sampler = build_sampler(stream_cfg.sampling, self.manifest.data, self.batch_size,
                                     rank, world_size, seed, self.salt)
        self.augment = Augmenter(stream_cfg, min_class_pixels(stream_cfg.sampling), resample)
        self.resample = resample

    def rng(self, step: int, slot: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.salt, self.rank, step, slot])

    def plan(self, step: int, slot: int) -> Planned:
        rng = self.rng(step, slot)
        pick: Pick = self.sampler.pick(step, slot, rng)
        comps = self.reader.read(pick.index)
        info = self.manifest.sample(pick.index)
        label = None
        origin = self.reader.origin(pick.index)
        if self.with_labels:
            try:
                label = decode_seg(comps[SEG_EXT], f"{origin}.{SEG_EXT}")
            except BadSample as exc:
                raise DataError(str(exc)) from None
        w, h = info["size"]
        geom, seg = self.augment.draw(rng, (h, w), label, pick)
        meta = {"key": info["key"], "source": info["source"], "index": pick.index,
                "dataset": info.get("dataset", self.manifest.data["dataset"]),
                "split": info.get("split", self.manifest.data["split"]),
                "ori_shape": [h, w], "step": step, **geom.to_meta()}
        if pick.cls >= 0:
            meta["sampled_class"] = pick.cls
        ext = image_ext(comps)
        return Planned(comps[ext], geom, seg, meta, f"{origin}.{ext}")


class Prefetcher:
    """Runs ``fn(step, slot)`` for the next ``depth`` steps in a thread pool; ``get(step)``
    must be called with consecutive steps. Results do not depend on timing (pure functions)."""

    def __init__(self, fn: Callable[[int, int], object], batch_size: int, start: int, depth: int,
                 threads: int):
        self.fn, self.b, self.depth = fn, batch_size, depth
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="eglp-data")
        self.futures: Dict[int, list] = {}
        self.next_submit = start

    def get(self, step: int) -> list:
        while self.next_submit <= step + self.depth:
            s = self.next_submit
            self.futures[s] = [self.pool.submit(self.fn, s, i) for i in range(self.b)]
            self.next_submit += 1
        return [f.result() for f in self.futures.pop(step)]

    def close(self) -> None:
        for futs in self.futures.values():
            for f in futs:
                f.cancel()
        self.futures.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)


def normalise_into(out: torch.Tensor, images: Sequence[np.ndarray], mean, std) -> torch.Tensor:
    """uint8 HWC arrays -> ``out`` [B,3,H,W] (zeros = padding), normalised on out's device."""
    m = torch.tensor(mean, dtype=torch.float32, device=out.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=out.device).view(3, 1, 1)
    for i, a in enumerate(images):
        t = torch.from_numpy(np.ascontiguousarray(a)).to(out.device, non_blocking=True)
        t = t.permute(2, 0, 1).float().sub_(m).div_(s)
        out[i, :, : t.shape[1], : t.shape[2]] = t
    return out


def collate_segs(segs: Sequence[np.ndarray], hw, device) -> torch.Tensor:
    """uint8 label crops -> int64 [B,H,W] on device, padded with 255 to ``hw``."""
    out = np.full((len(segs),) + tuple(hw), 255, np.uint8)
    for i, s in enumerate(segs):
        out[i, : s.shape[0], : s.shape[1]] = s
    return torch.from_numpy(out).to(device, non_blocking=True).long()


def batch_hw(geoms: Sequence[Geometry]) -> tuple:
    """Common size of a batch: the crop size, or the largest sample when not cropping."""
    return (max(g.pad_hw[0] for g in geoms), max(g.pad_hw[1] for g in geoms))


class TrainStream:
    """Infinite iterator of training batches of one stream on one rank; exact resume.

    ``state_dict()`` holds the number of batches consumed (and what they depend on);
    ``load_state_dict()`` continues with exactly the batches an uninterrupted run would have
    produced next, provided seed, world size and batch size are unchanged (else a warning).
    """

    def __init__(self, name: str, stream_cfg, data_cfg, rank: int, world_size: int, seed: int,
                 device):
        check_stream(stream_cfg, f"data.{name}")
        self.name, self.rank, self.world_size = name, rank, world_size
        self.device = torch.device(device)
        self.stream_cfg, self.data_cfg = stream_cfg, data_cfg
        self.source = SampleSource(name, stream_cfg, rank, world_size, seed, data_cfg.resample)
        self.backend = data_cfg.backend
        self.step = 0
        self._producer = None

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
        if self.backend == "dali":
            from eglp_dist.data.dali import DaliTrainProducer
            return DaliTrainProducer(self.source, self.data_cfg, start, self.device)
        from eglp_dist.data.wds import PilTrainProducer
        return PilTrainProducer(self.source, self.data_cfg, start, self.device)

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
        for key, mine in (("world_size", self.world_size), ("batch_size", self.batch_size),
                          ("num_samples", self.num_samples), ("seed", self.source.seed)):
            if state.get(key, mine) != mine:
                warnings.warn(f"data stream {self.name!r}: resuming with {key}={mine} but the "
                              f"checkpoint has {state[key]}; batches will differ from the "
                              f"uninterrupted run", stacklevel=2)
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
                       seed: Optional[int] = None, device="cpu", name: Optional[str] = None
                       ) -> TrainStream:
    """An infinite, exactly resumable stream of augmented batches for one rank.

    ``stream_cfg`` is one of ``data_cfg.source/target/prompt`` (its name is found by
    identity, or pass ``name``); ``seed`` defaults to ``data_cfg.seed``.
    """
    check_data_config(data_cfg)
    name = name or _stream_name(stream_cfg, data_cfg)
    return TrainStream(name, stream_cfg, data_cfg, rank, world_size,
                       data_cfg.seed if seed is None else seed, device)


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
        self.backend = data_cfg.backend
        self.resample = data_cfg.resample

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[dict]:
        if not len(self.indices):
            return iter(())
        if self.backend == "dali":
            from eglp_dist.data.dali import iter_eval_dali
            return iter_eval_dali(self)
        from eglp_dist.data.wds import iter_eval_wds
        return iter_eval_wds(self)

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
