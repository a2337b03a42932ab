"""The ``pil`` back-end: PIL decoding and resampling in threads (training and evaluation);
evaluation reads its shards sequentially with the webdataset library.

Training samples come from ``loader.SampleSource`` (sampler + random access by .idx offset),
so this module only turns a planned sample into pixels: decode (PIL), resample the planned
crop (``augment.resize_crop``: cv2, as mmcv; or PIL ``Image.resize(box=...)``), mirror, then
normalise and pad on the target device. PIL and cv2 release the GIL while decoding and
resampling, so a thread pool scales across cores without worker processes (cv2's own thread
pool is switched off for it: the samples are the parallel work).

Evaluation streams this rank's contiguous part of the split through
``webdataset.WebDataset`` (sequential tar reads; splitting is ours, by sample, so it equals
DALI's ``shard_id=rank`` split and needs no node splitter).
"""
from __future__ import annotations

import json
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image

from eglp_dist.data.augment import Geometry, eval_geometry, resize_crop
from eglp_dist.data.codecs import BadSample, decode_seg, load_rgb
from eglp_dist.data.planning import Prefetcher, SampleSource, attach_labels, batch_hw, normalise_into
from eglp_dist.data.shards import SEG_EXT, image_ext
from eglp_dist.errors import DataError


def resample(image: bytes, geom: Geometry, name: str = "image", mode: str = "mmcv") -> np.ndarray:
    """Decode an encoded image and cut out ``geom``'s crop at its size (``data.resample``:
    mmcv's cv2 INTER_LINEAR resize, or PIL's antialiased bilinear), mirrored if ``geom.flip``
    -> uint8 [h, w, 3]."""
    try:
        im = load_rgb(image, name)
    except BadSample as exc:
        raise DataError(str(exc)) from None
    h, w = geom.out_hw
    box = tuple(geom.box)
    if (w, h) != im.size or box != (0.0, 0.0, float(im.size[0]), float(im.size[1])):
        if mode == "mmcv":
            _single_threaded_cv2()
            arr = resize_crop(np.asarray(im), geom)
            return np.ascontiguousarray(arr[:, ::-1] if geom.flip else arr)
        im = im.resize((w, h), Image.BILINEAR, box=box)
    if geom.flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return np.array(im)  # writable copy (torch.from_numpy refuses read-only buffers)


def _single_threaded_cv2() -> None:
    import cv2

    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)


class PilTrainProducer:
    """Batches of a TrainStream from a thread pool (``data.num_threads``)."""

    def __init__(self, source: SampleSource, data_cfg, start: int, device: torch.device,
                 timeout: Optional[float] = None):
        self.source, self.device = source, device
        self.mean, self.std = list(data_cfg.mean), list(data_cfg.std)
        self.prefetch = Prefetcher(self._sample, source.batch_size, start, data_cfg.prefetch,
                                   data_cfg.num_threads, timeout)

    def _sample(self, step: int, slot: int):
        p = self.source.plan(step, slot)
        return resample(p.image, p.geom, p.origin, self.source.resample), p

    def get(self, step: int) -> dict:
        results = self.prefetch.get(step)
        plans = [p for _, p in results]
        hw = batch_hw([p.geom for p in plans])
        img = torch.zeros((len(plans), 3) + hw, dtype=torch.float32, device=self.device)
        batch = {"img": normalise_into(img, [a for a, _ in results], self.mean, self.std),
                 "meta": [p.meta for p in plans]}
        return attach_labels(batch, plans, hw, self.device)

    def close(self) -> None:
        self.prefetch.close()


def iter_eval_pil(loader) -> Iterator[dict]:
    """This rank's evaluation samples, streamed with the webdataset library."""
    import webdataset as wds

    m = loader.manifest
    lo, hi = loader.indices.start, loader.indices.stop
    starts = m.shard_starts
    sizes = [s["num_samples"] for s in m.data["shards"]]
    used = [i for i in range(len(starts)) if starts[i] < hi and starts[i] + sizes[i] > lo]
    urls = [str(m.shard_paths[i]) for i in used]
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None,
                        empty_check=False)
    index = starts[used[0]]
    mean, std = list(loader.data_cfg.mean), list(loader.data_cfg.std)
    for sample in ds:
        if index >= hi:
            break
        if index >= lo:
            meta = json.loads(sample["json"])
            if meta["key"] != sample["__key__"]:
                raise DataError(f"{sample['__url__']}: sample {sample['__key__']} has meta of "
                                f"{meta['key']}")
            w, h = meta["size"]
            geom = eval_geometry((h, w), loader.img_scale)
            origin = f"{sample['__url__']}:{meta['key']}"
            ext = image_ext(sample)
            arr = resample(sample[ext], geom, f"{origin}.{ext}", loader.resample)
            img = torch.zeros((1, 3) + tuple(geom.out_hw), dtype=torch.float32, device=loader.device)
            batch = {"img": normalise_into(img, [arr], mean, std),
                     "meta": [loader.meta(index, meta, geom.out_hw)]}
            if loader.with_labels:
                try:
                    seg = decode_seg(sample[SEG_EXT], f"{origin}.{SEG_EXT}")
                except BadSample as exc:
                    raise DataError(str(exc)) from None
                batch["seg"] = torch.from_numpy(seg.copy()).to(loader.device).long()[None]
            yield batch
        index += 1
