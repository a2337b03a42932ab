"""What a run shows while it trains: a progress line on rank 0 and TensorBoard scalars/images.

(The module is ``eglp_dist.logging``, as docs/design.md lays out; it never shadows the standard
library's ``logging``, which absolute imports keep reaching.)

Losses are kept as tensors and summed locally every step; only at a log interval are they
all-reduced (one collective for all of them) and averaged over ranks and steps, so the
numbers shown are the global ones mmcv's logger shows, and no step waits on the device.
On a terminal the progress is a tqdm bar; in a SLURM log (no TTY) it is one plain line per
log interval, because carriage-return bars make unreadable batch logs.
"""
from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Dict, Mapping, Optional, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from eglp_dist.data.labels import CLASSES, colorize
from eglp_dist.runtime import comm

# Order of the picture grid's columns; a method fills the ones it has.
GRID_ORDER = ("src_img", "src_seg", "src_pred", "tgt_img", "tgt_seg", "tgt_pseudo", "mix_img", "mix_seg",
              "mix_pred", "prompt_img", "prompt_seg", "prompt_pred")


def image_grid(visuals: Mapping[str, torch.Tensor], mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """One row, HWC uint8: images de-normalised, label maps (``*_seg``/``*_pred``/``*_pseudo``,
    train ids) in the Cityscapes palette; every panel resized to the first one's size."""
    panels = []
    size = None
    for key in GRID_ORDER:
        if key not in visuals:
            continue
        value = visuals[key][0].cpu()
        if value.is_floating_point() and value.dim() == 3:  # normalised image [3, H, W]
            img = value.float() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
            size = size or tuple(img.shape[-2:])
            img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
            panels.append(img.clamp(0, 255).byte().permute(1, 2, 0).numpy())
        else:  # label map [H, W]
            seg = value.long()
            size = size or tuple(seg.shape[-2:])
            seg = F.interpolate(seg[None, None].float(), size=size, mode="nearest")[0, 0].long()
            panels.append(colorize(seg.clamp(0, 255).byte().numpy()))
    if not panels:
        return np.zeros((1, 1, 3), dtype=np.uint8)
    gap = np.full((panels[0].shape[0], 4, 3), 255, dtype=np.uint8)
    row = [p for panel in panels for p in (panel, gap)][:-1]
    return np.concatenate(row, axis=1)


def check_same_keys(keys) -> None:
    """Collective: every rank must log the same keys, since their values are reduced by
    position. One two-number MAX reduction compares a digest of the key set; where ranks
    differ, their key lists are gathered and the error names the keys that differ (on every
    rank, so all of them stop alike instead of hanging or mixing up values)."""
    import zlib

    if comm.world_size() == 1:
        return
    digest = float(zlib.crc32("\n".join(keys).encode()) & 0xFFFFFF)  # exact in float32
    both = comm.all_reduce_max(torch.tensor([digest, -digest]))
    if both[0] == -both[1]:
        return
    lists = comm.all_gather_object(list(keys))
    union = sorted(set().union(*map(set, lists)))
    differing = [k for k in union if not all(k in keys for keys in lists)]
    where = "; ".join(f"rank {r} lacks {', '.join(k for k in differing if k not in keys)}"
                      for r, keys in enumerate(lists) if any(k not in keys for k in differing))
    raise RuntimeError(f"ranks logged different keys ({where}): every rank must log the same keys "
                       f"every step, whatever its data (log a zero, not nothing)")


class Counter(Protocol):
    """Counts a part accumulates on the device between log intervals (e.g. a confusion
    matrix), reduced by SUM in the log interval's one collective and turned into scalars."""

    name: str

    def take(self) -> torch.Tensor:
        """The counts since the last call (any shape; the same size on every rank), reset."""

    def summarise(self, reduced: torch.Tensor) -> Dict[str, float]:
        """Scalars to log from the run-wide counts (NaN: undefined, e.g. a class never seen)."""


class Monitor:
    """Rank 0 writes (TensorBoard, the progress line, ``train.jsonl``: one line of global
    values per log interval, for tools that read a run's history); every rank must call
    ``flush`` (it all-reduces)."""

    def __init__(self, run_dir: Path, enabled: bool, start: int, max_iters: int, images_per_iter: int):
        self.enabled = enabled
        self.max_iters = max_iters
        self.images_per_iter = images_per_iter
        self.writer = None
        self.bar = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tb"))
            if sys.stdout.isatty():
                from tqdm import tqdm

                self.bar = tqdm(total=max_iters, initial=start, dynamic_ncols=True, desc="train")
        self._sums: Dict[str, torch.Tensor] = {}
        self._steps = 0
        self._since_it = start
        self._since_t = time.perf_counter()
        self._jsonl = Path(run_dir) / "train.jsonl"

    def accumulate(self, logs: Mapping[str, torch.Tensor]) -> None:
        for key, value in logs.items():
            value = value.detach().float()
            self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()
        self._steps += 1
        if self.bar is not None:
            self.bar.update(1)

    def flush(self, it: int, extra: Optional[Mapping[str, float]] = None,
              counters: Sequence[Counter] = ()) -> Dict[str, float]:
        """Collective: global averages since the last flush, written at iteration ``it`` (the
        number of iterations done), and the ``counters``' scalars from their run-wide sums.
        One all-reduce for all of them. Returns the values (on every rank)."""
        keys = sorted(self._sums)
        counts = [c.take() for c in counters]
        # the counters' names and sizes join the key digest: a rank with other counters
        # must fail by name, not mix up positions
        check_same_keys(keys + [f"{c.name}:{t.numel()}" for c, t in zip(counters, counts)])
        values = {}
        if keys or counts:
            # one collective (comm.reduce_sums: one float64 message on the backend's device,
            # whatever device each value is on; float64 keeps pixel counts exact)
            device = comm.backend_device()  # torch.stack cannot mix host and GPU values
            parts = [torch.stack([self._sums[k].reshape(()).to(device, torch.float64) for k in keys])] if keys else []
            reduced = comm.reduce_sums(parts + [t.reshape(-1) for t in counts])
            if keys:
                means = reduced.pop(0) / (comm.world_size() * max(self._steps, 1))
                values = dict(zip(keys, means.tolist()))
            for c, t, vec in zip(counters, counts, reduced):
                values.update(c.summarise(vec.view(t.shape).cpu()))
        now = time.perf_counter()
        iters = it - self._since_it
        elapsed = max(now - self._since_t, 1e-9)
        values["time/images_per_s"] = iters * self.images_per_iter * comm.world_size() / elapsed
        values["time/s_per_iter"] = elapsed / max(iters, 1)
        values.update(extra or {})
        self._sums, self._steps, self._since_it, self._since_t = {}, 0, it, now
        if self.enabled:
            for key, value in values.items():
                if not np.isnan(value):
                    self.writer.add_scalar(key if "/" in key else f"train/{key}", value, it)
            self._show(it, values)
            with open(self._jsonl, "a") as f:
                f.write(json.dumps({"iter": it, **{k: (None if np.isnan(v) else v) for k, v in values.items()}})
                        + "\n")
        return values

    def _show(self, it: int, values: Mapping[str, float]) -> None:
        losses = {k: v for k, v in values.items() if "loss" in k or "confidence" in k}
        text = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
        speed = f"{values['time/images_per_s']:.1f} img/s"
        if self.bar is not None:
            self.bar.set_postfix_str(f"{text} {speed}", refresh=False)
            return
        eta = timedelta(seconds=int(values["time/s_per_iter"] * (self.max_iters - it)))
        print(f"iter {it}/{self.max_iters} | {text} | {speed} | eta {eta}", flush=True)

    def images(self, it: int, visuals: Mapping[str, torch.Tensor], mean, std) -> None:
        if self.enabled and visuals:
            self.writer.add_image("train/grid", image_grid(visuals, mean, std), it, dataformats="HWC")

    def evaluation(self, it: int, results, prefix: str = "val") -> None:
        """Scalars of every target (``evaluate.TargetMetrics`` by name): ``val/NAME/mIoU``
        (its headline class set), ``val/NAME/mIoU_<set>``, ``val/NAME/aAcc``,
        ``val_IoU/NAME/<class>``, and ``val/mIoU``, the average over targets."""
        if not self.enabled:
            return
        parts = []
        for name, r in results.items():
            m = r.metrics
            self.writer.add_scalar(f"{prefix}/{name}/mIoU", r.headline, it)
            for s in r.class_sets[1:]:
                self.writer.add_scalar(f"{prefix}/{name}/mIoU_{s}", m.miou_of_set(s), it)
            self.writer.add_scalar(f"{prefix}/{name}/aAcc", m.overall_acc, it)
            for cls, iou in zip(CLASSES, m.iou):
                if not np.isnan(iou):
                    self.writer.add_scalar(f"{prefix}_IoU/{name}/{cls}", float(iou), it)
            parts.append(f"{name} {100 * r.headline:.2f}")
        average = float(np.mean([r.headline for r in results.values()]))
        self.writer.add_scalar(f"{prefix}/mIoU", average, it)
        self.writer.flush()
        detail = f" ({', '.join(parts)})" if len(parts) > 1 else f" ({parts[0].split()[0]})"
        self.write(f"iter {it}: {prefix} mIoU {100 * average:.2f}{detail}")

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
