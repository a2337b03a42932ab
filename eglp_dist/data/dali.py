"""The DALI backend: image decoding on the GPU (``device='mixed'``, nvJPEG) where CUDA is
available, on the CPU (pipeline ``device_id=None``) where not: one code path, one setting
(``data.decode_device``).

Training: ``fn.external_source`` feeds the encoded images our sampler chose (read by .idx
offset) with each sample's planned box, size and flip, and DALI decodes, resamples the box
(``fn.resize`` with ``roi_start/roi_end``; a flip is the same ROI with its x ends swapped),
normalises and pads (``fn.crop_mirror_normalize``). Labels are not touched by DALI: their
crop was decided and cut from the losslessly decoded label by ``augment.Augmenter``, the same
code the PIL backend uses, so both backends give bit-identical label tensors.

Why not ``fn.readers.webdataset`` for training: a sequential sharded reader cannot do rare
class sampling (class-conditioned random access) nor resume exactly mid-epoch; it is used
for evaluation, with ``shard_id=rank, num_shards=world_size``, where a sequential pass over
each rank's part is exactly what is wanted.
"""
from __future__ import annotations

import json
from typing import Iterator, Optional

import numpy as np
import torch

from eglp_dist.data.planning import Prefetcher, SampleSource, attach_labels, to_device
from eglp_dist.data.shards import SEG_EXT
from eglp_dist.errors import ConfigError, DataError


def decode_placement(data_cfg, device: torch.device):
    """(DALI decoder device, pipeline device_id): 'mixed' on the GPU when CUDA is there."""
    want = data_cfg.decode_device
    cuda = torch.cuda.is_available() and device.type == "cuda"
    if want == "mixed" and not cuda:
        raise ConfigError("data.decode_device: 'mixed' needs a CUDA device, none is in use")
    if want == "cpu" or not cuda:
        return "cpu", None
    return "mixed", (device.index if device.index is not None else torch.cuda.current_device())


def to_torch(tl, device: torch.device) -> torch.Tensor:
    """A dense DALI TensorList (CPU or GPU) -> a torch tensor on ``device`` (copied)."""
    from nvidia.dali.backend import TensorListGPU

    t = tl.as_tensor()
    if isinstance(tl, TensorListGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return to_device(torch.from_numpy(np.array(t)), device)


def _train_pipeline(feed, batch_size: int, decoder: str, device_id, threads: int, crop_hw,
                    mean, std, prefetch: int, antialias: bool):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id,
                  prefetch_queue_depth=prefetch, exec_async=True, exec_pipelined=True)
    def pipe():
        data, roi_start, roi_end, size = fn.external_source(
            source=feed, num_outputs=4, batch=True, batch_info=True,
            dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.FLOAT])
        images = fn.decoders.image(data, device=decoder, output_type=types.RGB)
        images = fn.resize(images, size=size, roi_start=roi_start, roi_end=roi_end,
                           roi_relative=False, interp_type=types.INTERP_LINEAR, antialias=antialias)
        if crop_hw is not None:  # pad bottom/right to the crop size with 0 (after normalising)
            return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                            mean=mean, std=std, crop=crop_hw, crop_pos_x=0.0,
                                            crop_pos_y=0.0, out_of_bounds_policy="pad",
                                            fill_values=0.0)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=mean, std=std)
        return fn.pad(images, axis_names="HW", fill_value=0.0)  # to the batch's largest

    p = pipe()
    p.build()
    return p


def decode_error(exc: Exception, plans) -> DataError:
    """A DALI failure as a DataError naming the sample: the first planned image that PIL
    cannot decode either (DALI's own message names neither shard nor key)."""
    from eglp_dist.data.codecs import BadSample, load_rgb

    for p in plans:
        try:
            load_rgb(p.image, p.origin)
        except BadSample as bad:
            return DataError(str(bad))
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    names = ", ".join(p.origin for p in plans) or "an unknown sample"
    return DataError(f"DALI failed on a batch of {names}: {first}")


class DaliTrainProducer:
    """Batches of a TrainStream from a DALI pipeline fed by planned samples."""

    def __init__(self, source: SampleSource, data_cfg, start: int, device: torch.device,
                 timeout: Optional[float] = None):
        self.source, self.device, self.start = source, device, start
        decoder, device_id = decode_placement(data_cfg, device)
        self.prefetch = Prefetcher(source.plan, source.batch_size, start, data_cfg.prefetch + 1,
                                   data_cfg.num_threads, timeout)
        self.plans = {}
        crop = source.augment.crop
        self.pipe = _train_pipeline(self._feed, source.batch_size, decoder, device_id,
                                    data_cfg.num_threads, list(crop) if crop else None,
                                    list(data_cfg.mean), list(data_cfg.std), 2,
                                    data_cfg.resample == "antialias")

    def _feed(self, info):
        """external_source callback: iteration i of this pipeline is step start + i."""
        step = self.start + info.iteration
        plans = self.prefetch.get(step)
        self.plans[step] = plans
        data = [np.frombuffer(p.image, np.uint8) for p in plans]
        starts, ends, sizes = [], [], []
        for p in plans:
            x0, y0, x1, y1 = p.geom.box
            if p.geom.flip:
                x0, x1 = x1, x0
            starts.append(np.array([y0, x0], np.float32))
            ends.append(np.array([y1, x1], np.float32))
            sizes.append(np.array(p.geom.out_hw, np.float32))
        return data, starts, ends, sizes

    def get(self, step: int) -> dict:
        try:
            (images,) = self.pipe.run()
        except RuntimeError as exc:
            raise decode_error(exc, self.plans.get(step, [])) from None
        plans = self.plans.pop(step)
        batch = {"img": to_torch(images, self.device), "meta": [p.meta for p in plans]}
        return attach_labels(batch, plans, tuple(batch["img"].shape[-2:]), self.device)

    def close(self) -> None:
        self.prefetch.close()
        del self.pipe


def _eval_pipeline(loader, decoder: str, device_id, with_labels: bool):
    from nvidia.dali import fn, math as dmath, pipeline_def, types

    m = loader.manifest
    exts = ["jpg;png", "json"] + ([SEG_EXT] if with_labels else [])

    @pipeline_def(batch_size=1, num_threads=loader.data_cfg.num_threads, device_id=device_id,
                  prefetch_queue_depth=2)
    def pipe():
        outs = fn.readers.webdataset(
            paths=[str(p) for p in m.shard_paths], index_paths=[str(p) for p in m.index_paths],
            ext=exts, shard_id=loader.rank, num_shards=loader.world_size, random_shuffle=False,
            pad_last_batch=False, missing_component_behavior="error", name="reader")
        raw, meta = outs[0], outs[1]
        images = fn.decoders.image(raw, device=decoder, output_type=types.RGB)
        if loader.img_scale is not None:  # MMSeg keep-ratio rescale, int(x + 0.5) rounding
            shape = fn.cast(fn.peek_image_shape(raw), dtype=types.FLOAT64)
            h, w = shape[0], shape[1]
            long_, short = float(max(loader.img_scale)), float(min(loader.img_scale))
            sf = dmath.min(long_ / dmath.max(h, w), short / dmath.min(h, w))
            size = fn.cast(fn.stack(dmath.floor(h * sf + 0.5), dmath.floor(w * sf + 0.5)),
                           dtype=types.FLOAT)
            images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR,
                               antialias=loader.resample == "antialias")
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=list(loader.data_cfg.mean),
                                          std=list(loader.data_cfg.std))
        if with_labels:  # lossless: one-channel PNG, decoded on the CPU as stored
            seg = fn.decoders.image(outs[2], device="cpu", output_type=types.ANY_DATA)
            return images, meta, seg
        return images, meta

    p = pipe()
    p.build()
    return p


def iter_eval_dali(loader) -> Iterator[dict]:
    """This rank's evaluation samples via ``fn.readers.webdataset(shard_id=rank)``."""
    decoder, device_id = decode_placement(loader.data_cfg, loader.device)
    pipe = _eval_pipeline(loader, decoder, device_id, loader.with_labels)
    try:
        for index in loader.indices:
            try:
                outs = pipe.run()
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise DataError(f"{loader.manifest.origin(index)}: DALI cannot decode this evaluation sample "
                                f"({first})") from None
            meta = json.loads(np.array(outs[1][0]).tobytes())
            expected = loader.manifest.sample(index)["key"]
            if meta["key"] != expected:  # DALI's sharding must equal shards.eval_range
                raise DataError(f"{loader.manifest.folder}: DALI reader gave {meta['key']} "
                                f"where sample {index} ({expected}) was expected")
            img = to_torch(outs[0], loader.device)
            batch = {"img": img, "meta": [loader.meta(index, meta, tuple(img.shape[-2:]))]}
            if loader.with_labels:
                seg = np.array(outs[2][0])
                if seg.ndim != 3 or seg.shape[2] != 1:
                    raise DataError(f"{loader.manifest.origin(index)}.{SEG_EXT}: label decoded with shape "
                                    f"{seg.shape}, expected one channel")
                batch["seg"] = torch.from_numpy(seg[..., 0].copy()).to(loader.device).long()[None]
            yield batch
    finally:
        del pipe
