"""Planning a training sample without decoding it, and the pieces every back-end shares:
``SampleSource`` decides sample (step, slot) of a rank (pick, read, label crop, geometry),
``Prefetcher`` runs those plans ahead in threads, and ``normalise_into``/``collate_segs``/
``batch_hw`` turn decoded pixels into batch tensors. The back-ends (``data/pil.py``,
``data/dali.py``) only decode and resample; ``data/loader.py`` is the facade that picks one.
"""
from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from eglp_dist.data.augment import Augmenter, Geometry
from eglp_dist.data.codecs import BadSample, decode_seg
from eglp_dist.data.config import shard_folders
from eglp_dist.data.sampling import Pick, build_sampler, min_class_pixels
from eglp_dist.data.shards import SEG_EXT, image_ext, open_shards
from eglp_dist.device_constants import constant
from eglp_dist.errors import ConfigError, DataError


class StalledStream(RuntimeError):
    """A training stream produced no batch within the step timeout."""


@dataclass
class Planned:
    """One training sample, decided but not decoded: image bytes + geometry + label crop."""

    image: bytes
    geom: Geometry
    seg: Optional[np.ndarray]  # uint8 [pad_hw], flipped and padded (None if unlabelled)
    meta: dict
    origin: str  # '<shard>:<key>.<ext>' of the image, named by decode errors
    # (256,) pixels per label value of ``seg``, counted here in the prefetch thread, off the
    # step's path (ClassMix's candidates, the rare-class memory's counts: no GPU sync)
    label_counts: Optional[np.ndarray] = None
    # ground truth of an unlabelled stream, for diagnostics only (``SampleSource(ground_truth=
    # True)``): the same crop and flip as the image, drawn *without* looking at it
    gt: Optional[np.ndarray] = None


def stream_salt(name: str) -> int:
    """A per-stream constant mixed into every seed, so source and target draw differently."""
    return zlib.crc32(name.encode())


def open_stream_shards(name: str, stream_cfg):
    """A stream's shard folders opened and validated (``shards.open_shards``)."""
    folders = shard_folders(stream_cfg.shards, f"data.{name}.shards")
    if not folders:
        raise ConfigError(f"data.{name}.shards: no shard folder set for stream {name!r}")
    return open_shards(folders)


class SampleSource:
    """Decides training sample (step, slot) of one rank: pick, read, label crop, geometry."""

    def __init__(self, name: str, stream_cfg, rank: int, world_size: int, seed: int,
                 resample: str = "mmcv", ground_truth: bool = False):
        """``ground_truth``: an unlabelled stream (``with_labels=false``) reads its labels
        anyway, for diagnostics only (the pseudo-label IoU): they never decide a crop (the
        geometry is drawn as without them, so the batches are the same) and reach the batch
        as ``gt``, never as ``seg``, so no loss can take them by mistake."""
        self.reader = open_stream_shards(name, stream_cfg)
        self.manifest = self.reader.manifest
        self.with_labels = bool(stream_cfg.with_labels)
        self.ground_truth = bool(ground_truth) and not self.with_labels
        if self.with_labels and not self.manifest.labelled:
            raise ConfigError(f"data.{name}.with_labels: {stream_cfg.shards} has no labels "
                              f"(packed from an unlabelled split); set with_labels=false")
        if self.ground_truth and not self.manifest.labelled:
            raise ConfigError(f"data.{name}: the pseudo-label diagnostic needs labels, but "
                              f"{stream_cfg.shards} has none (packed from an unlabelled split)")
        if self.with_labels or self.ground_truth:
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
        if self.with_labels or self.ground_truth:
            try:
                label = decode_seg(comps[SEG_EXT], f"{origin}.{SEG_EXT}")
            except BadSample as exc:
                raise DataError(str(exc)) from None
        w, h = info["size"]
        geom, seg = self.augment.draw(rng, (h, w), label if self.with_labels else None, pick)
        gt = self.augment.label_under(geom, label) if self.ground_truth else None
        meta = {"key": info["key"], "source": info["source"], "index": pick.index,
                "dataset": info.get("dataset", self.manifest.data["dataset"]),
                "split": info.get("split", self.manifest.data["split"]),
                "ori_shape": [h, w], "step": step, **geom.to_meta()}
        if pick.cls >= 0:
            meta["sampled_class"] = pick.cls
        ext = image_ext(comps)
        counts = np.bincount(seg.ravel(), minlength=256) if seg is not None else None
        return Planned(comps[ext], geom, seg, meta, f"{origin}.{ext}", counts, gt)


class Prefetcher:
    """Runs ``fn(step, slot)`` for the next ``depth`` steps in a thread pool; ``get(step)``
    must be called with consecutive steps. Results do not depend on timing (pure functions)."""

    def __init__(self, fn: Callable[[int, int], object], batch_size: int, start: int, depth: int,
                 threads: int, timeout: Optional[float] = None):
        self.fn, self.b, self.depth, self.timeout = fn, batch_size, depth, timeout
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="eglp-data")
        self.futures: Dict[int, list] = {}
        self.next_submit = start

    def get(self, step: int) -> list:
        while self.next_submit <= step + self.depth:
            s = self.next_submit
            self.futures[s] = [self.pool.submit(self.fn, s, i) for i in range(self.b)]
            self.next_submit += 1
        futures = self.futures.pop(step)
        try:
            return [f.result(timeout=self.timeout) for f in futures]
        except FuturesTimeout:
            raise StalledStream(f"no batch for step {step} within {self.timeout:g} s (dist.step_timeout_s): "
                                f"reading or decoding is stuck") from None

    def close(self) -> None:
        for futs in self.futures.values():
            for f in futs:
                f.cancel()
        self.futures.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on ``device``. To a GPU the copy goes through pinned memory (torch's
    caching host allocator reuses the blocks), so ``non_blocking`` really overlaps: from
    pageable memory the copy would be synchronous whatever the flag says."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def normalise_into(out: torch.Tensor, images: Sequence[np.ndarray], mean, std) -> torch.Tensor:
    """uint8 HWC arrays -> ``out`` [B,3,H,W] (zeros = padding), normalised on out's device."""
    m = constant(list(mean), out.device, torch.float32, (3, 1, 1))
    s = constant(list(std), out.device, torch.float32, (3, 1, 1))
    for i, a in enumerate(images):
        t = to_device(torch.from_numpy(np.ascontiguousarray(a)), out.device)
        t = t.permute(2, 0, 1).float().sub_(m).div_(s)
        out[i, :, : t.shape[1], : t.shape[2]] = t
    return out


def collate_segs(segs: Sequence[np.ndarray], hw, device,
                 counts: Optional[Sequence[Optional[np.ndarray]]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 label crops -> (int64 [B,H,W] on device, padded with 255 to ``hw``; (B, 256) host
    pixel counts per label value, padding included). The counts come from the plans (counted
    in the prefetch threads; the batch's extra padding is added to 255's) or are counted here,
    on the CPU either way, so the step never waits for the GPU to list a crop's classes
    (ClassMix's candidates) or to count them (the rare-class memory)."""
    out = np.full((len(segs),) + tuple(hw), 255, np.uint8)
    table = np.zeros((len(segs), 256), np.int64)
    for i, s in enumerate(segs):
        out[i, : s.shape[0], : s.shape[1]] = s
        if counts is not None and counts[i] is not None:
            table[i] = counts[i]
            table[i, 255] += out[i].size - s.size
        else:
            table[i] = np.bincount(out[i].ravel(), minlength=256)
    return to_device(torch.from_numpy(out), device).long(), torch.from_numpy(table)


def attach_labels(batch: dict, plans: Sequence[Planned], hw, device) -> dict:
    """The plans' labels on the batch (both back-ends): ``seg`` + ``label_counts`` of a
    labelled stream, ``gt`` of a stream whose labels are read for diagnostics only."""
    if plans and plans[0].seg is not None:
        batch["seg"], batch["label_counts"] = collate_segs([p.seg for p in plans], hw, device,
                                                          [p.label_counts for p in plans])
    if plans and plans[0].gt is not None:
        batch["gt"] = collate_segs([p.gt for p in plans], hw, device)[0]
    return batch


def batch_hw(geoms: Sequence[Geometry]) -> tuple:
    """Common size of a batch: the crop size, or the largest sample when not cropping."""
    return (max(g.pad_hw[0] for g in geoms), max(g.pad_hw[1] for g in geoms))
