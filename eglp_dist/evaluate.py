"""Distributed inference and mIoU (``eglp eval``).

One inference path, :func:`iter_predictions`, serves evaluation and prediction export: each
image of this rank's share (``build_eval_loader``: resized to ``img_scale``, batch 1) goes
through ``model(img)`` (the segmentor's ``infer``: sliding test windows where configured),
the logits are resized bilinearly to the image's *original* size (MMSeg semantics) and the
argmax is yielded with the sample's meta. :func:`evaluate` accumulates a confusion matrix
from it and all-reduces it once at the end (ranks may hold one sample more or less than each
other, so nothing collective may run per image).

This module only computes predictions and metrics. Reading weights (files, checkpoint
folders, strict loading) is ``eglp_dist/weights.py``, shared with encoder conversion; the
servers' file naming and PNG writing (``eglp predict``) is ``eglp_dist/export.py``, which
uses :func:`iter_predictions` from here and the commands' shared setup
(``eglp_dist/cli_session.py``), so that both commands compute and load alike. The training loop uses::

    results = evaluate_targets(model, {name: loader, ...}, device, num_classes, autocast_dtype)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from eglp_dist.atomic import write_text_atomic
from eglp_dist.cli_session import cli_session, eval_targets
from eglp_dist.data.labels import CLASSES, NUM_CLASSES
from eglp_dist.data.planning import to_device
from eglp_dist.runtime import comm
from eglp_dist.runtime.precision import autocast
from eglp_dist.errors import DataError
from eglp_dist.metrics import ConfusionMeter, SegMetrics, format_table, metrics_from_confusion

# ----------------------------------------------------------------------------- inference


@dataclass
class Prediction:
    """One image's prediction at its original resolution (on the inference device)."""

    meta: Dict[str, Any]
    pred: torch.Tensor  # int64 [H, W] trainIds
    seg: Optional[torch.Tensor]  # int64 [H, W] label trainIds (255 = ignore), None if unlabelled
    confidence: Optional[torch.Tensor] = None  # float32 [H, W] max softmax probability, if asked


@dataclass
class EvalMetrics(SegMetrics):
    """``SegMetrics`` plus the all-reduced confusion matrix they were computed from."""

    confusion: Optional[torch.Tensor] = None  # int64 [K, K] on the CPU, rows = label


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model.eval()`` for the block; afterwards every submodule gets its own previous mode
    back (a plain ``model.train(was_training)`` would also flip deliberately frozen parts)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _original_hw(batch: Mapping[str, Any], i: int) -> Tuple[int, int]:
    if batch.get("seg") is not None:
        return tuple(batch["seg"].shape[-2:])  # type: ignore[return-value]
    h, w = batch["meta"][i]["ori_shape"]
    return int(h), int(w)


def iter_predictions(model: nn.Module, loader, device, autocast_dtype: Optional[torch.dtype] = None,
                     max_batches: Optional[int] = None, with_confidence: bool = False
                     ) -> Iterator[Prediction]:
    """This rank's predictions, one :class:`Prediction` per image, in loader order.

    ``model(img)`` must return logits at the input size (``Segmentor.forward`` in its default
    ``infer`` mode). The logits are resized bilinearly (``align_corners=False``) to the
    label's size, i.e. the original image size (``meta["ori_shape"]`` for unlabelled
    splits), in float32, before the argmax. The model is in eval mode while the iterator
    runs and gets its previous mode back when it is exhausted or closed. Nothing here is
    collective, so ranks may yield different numbers of predictions.
    """
    device = torch.device(device)
    batches = iter(loader)
    try:
        with eval_mode(model):
            for n, batch in enumerate(batches):
                if max_batches is not None and n >= max_batches:
                    break
                img = to_device(batch["img"], device)
                seg = batch.get("seg")
                # Grad mode is thread state: keep no_grad off the yields, so the consumer
                # runs with whatever mode it had.
                with torch.no_grad():
                    with autocast(device, autocast_dtype):
                        logits = model(img)
                    logits = logits.float()
                    outs = []
                    for i in range(img.shape[0]):
                        li = F.interpolate(logits[i:i + 1], size=_original_hw(batch, i), mode="bilinear",
                                           align_corners=False)
                        # argmax of the logits (not of the softmax, whose rounding could
                        # break near-ties differently): the same labels with or without
                        # confidences
                        pred = li.argmax(dim=1)[0]
                        conf = li.softmax(dim=1).amax(dim=1)[0] if with_confidence else None
                        outs.append(Prediction(batch["meta"][i], pred,
                                               None if seg is None else seg[i].to(device), conf))
                yield from outs
    finally:
        close = getattr(batches, "close", None)
        if close is not None:  # a generator stopped early (max_batches, consumer gone)
            close()


def _require_labels(loader) -> None:
    if not getattr(loader, "with_labels", True):
        # Decided from the manifest, so every rank raises alike (none waits in the reduce).
        name = getattr(loader, "name", "eval")
        raise DataError(f"data.{name}: {getattr(getattr(loader, 'manifest', None), 'folder', 'the loader')} "
                        f"has no labels (or with_labels=false); cannot compute mIoU")


def _local_confusion(model: nn.Module, loader, device, num_classes: int,
                     autocast_dtype: Optional[torch.dtype], max_batches: Optional[int]) -> torch.Tensor:
    meter = ConfusionMeter(num_classes, device=device)
    for p in iter_predictions(model, loader, device, autocast_dtype, max_batches):
        meter.update(p.pred, p.seg)
    return meter.matrix


def _metrics(matrix: torch.Tensor) -> "EvalMetrics":
    m = metrics_from_confusion(matrix)
    return EvalMetrics(iou=m.iou, acc=m.acc, overall_acc=m.overall_acc, confusion=matrix)


def evaluate(model: nn.Module, loader, device, num_classes: int = NUM_CLASSES,
             autocast_dtype: Optional[torch.dtype] = None, max_batches: Optional[int] = None
             ) -> SegMetrics:
    """mIoU of ``model`` over a labelled eval loader, across all ranks.

    Collective: every rank must call it (with its own share; shares may be unequal or
    empty); the confusion matrix is all-reduced exactly once, at the end. Returns an
    :class:`EvalMetrics` (a ``SegMetrics`` whose ``confusion`` is the reduced matrix);
    every rank gets the same numbers. ``max_batches`` caps the batches per rank (quick
    looks during training).
    """
    _require_labels(loader)
    device = torch.device(device)
    local = _local_confusion(model, loader, device, num_classes, autocast_dtype, max_batches)
    return _metrics(comm.all_reduce_sum(local.clone()).cpu())


@dataclass
class TargetMetrics:
    """One evaluation target's result: its metrics and what it was computed over."""

    name: str
    metrics: EvalMetrics
    class_sets: List[str]  # the first is the headline
    dataset: str
    split: str
    num_images: int

    @property
    def headline(self) -> float:
        return self.metrics.miou_of_set(self.class_sets[0])

    def as_dict(self, class_names: Sequence[str] = CLASSES) -> Dict[str, Any]:
        return dict(self.metrics.as_dict(class_names, self.class_sets), dataset=self.dataset,
                    split=self.split, num_images=self.num_images,
                    num_pixels=int(self.metrics.confusion.sum()))


def evaluate_targets(model: nn.Module, loaders: Mapping[str, Any], device,
                     num_classes: int = NUM_CLASSES, autocast_dtype: Optional[torch.dtype] = None,
                     max_batches: Optional[int] = None) -> Dict[str, TargetMetrics]:
    """Every target's metrics (``loaders``: name -> EvalLoader, each with its
    ``class_sets``), across all ranks: each rank runs its share of every target, then the
    targets' confusion matrices are all-reduced together in one collective. Every rank
    returns the same numbers, in the order of ``loaders``."""
    for loader in loaders.values():  # before any work: every rank raises alike
        _require_labels(loader)
    device = torch.device(device)
    local = [_local_confusion(model, loader, device, num_classes, autocast_dtype, max_batches)
             for loader in loaders.values()]
    if not local:
        return {}
    reduced = comm.all_reduce_sum(torch.stack(local)).cpu()
    return {name: TargetMetrics(name, _metrics(reduced[i]), list(getattr(loader, "class_sets", ["all"])),
                                str(loader.manifest.data["dataset"]), str(loader.manifest.data["split"]),
                                len(loader.manifest))
            for i, (name, loader) in enumerate(loaders.items())}


def average_miou(results: Mapping[str, TargetMetrics]) -> float:
    """The mean of the targets' headline mIoUs (the DG papers' "average" column)."""
    values = [r.headline for r in results.values()]
    return float(np.mean(values)) if values else float("nan")


def results_dict(results: Mapping[str, TargetMetrics], class_names: Sequence[str] = CLASSES) -> Dict[str, Any]:
    """What eval.jsonl / eval_val.json hold: the average and every target's numbers."""
    return {"mIoU": average_miou(results),
            "targets": {name: r.as_dict(class_names) for name, r in results.items()}}


def format_targets(results: Mapping[str, TargetMetrics]) -> str:
    """One row per target (images, headline class set and mIoU, the other sets), then the
    average of the headlines."""
    width = max([len("average")] + [len(n) for n in results]) + 2
    lines = [f"{'target':<{width}}{'dataset':<22}{'images':>7}  {'classes':<10}{'mIoU':>7}  other class sets",
             "-" * (width + 64)]
    for name, r in results.items():
        others = "  ".join(f"{s} {100 * r.metrics.miou_of_set(s):.2f}" for s in r.class_sets[1:])
        lines.append(f"{name:<{width}}{r.dataset + ' ' + r.split:<22}{r.num_images:>7}  "
                     f"{r.class_sets[0]:<10}{100 * r.headline:7.2f}  {others}".rstrip())
    lines.append("-" * (width + 64))
    lines.append(f"{'average':<{width}}{'':<22}{'':>7}  {f'({len(results)})':<10}{100 * average_miou(results):7.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def eval_json_path(checkpoint: Path, split: str = "val") -> Path:
    """Beside the run, never inside a checkpoint (read-only to evaluation, and listed file by
    file in its COMPLETE marker): ``<run>/eval/<iter_XXXXXXX>_val.json`` for a checkpoint
    folder of ``<run>/checkpoints/``, ``<folder>.eval_val.json`` beside any other folder,
    ``<stem>.eval_val.json`` beside a weight file."""
    if checkpoint.is_file():
        return checkpoint.with_name(f"{checkpoint.stem}.eval_{split}.json")
    checkpoint = checkpoint.resolve()
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / "eval" / f"{checkpoint.name}_{split}.json"
    return checkpoint.with_name(f"{checkpoint.name}.eval_{split}.json")


def run_cli(args: argparse.Namespace) -> int:
    """``eglp eval CONFIG CHECKPOINT [overrides] [--targets NAME ...]``: mIoU of every
    configured target (``data.val``) on all ranks; rank 0 prints each target's per-class
    table and the summary, and writes ``<checkpoint>/eval_val.json``."""
    with cli_session(args) as session:
        cfg, env = session.cfg, session.env
        loaders = {name: session.eval_loader(stream, f"val.{name}")
                   for name, stream in eval_targets(cfg, getattr(args, "targets", None)).items()}
        results = evaluate_targets(session.model, loaders, session.device, cfg.model.num_classes, session.amp)
        if env.is_main:
            classes = CLASSES if cfg.model.num_classes == NUM_CLASSES else \
                [str(i) for i in range(cfg.model.num_classes)]
            for name, r in results.items():
                print(f"== {name}: {r.dataset} {r.split} ({r.num_images} images, {env.world_size} rank(s))")
                print(format_table(r.metrics, classes, r.class_sets))
            print(f"checkpoint {session.checkpoint}")
            print(format_targets(results))
            result = dict(results_dict(results, classes), checkpoint=str(session.checkpoint),
                          config=str(args.config),
                          shards={n: _plain_shards(cfg.data.val[n].shards) for n in results})
            out = eval_json_path(session.checkpoint)
            try:
                write_text_atomic(out, json.dumps(result, indent=2) + "\n")
                print(f"wrote {out}")
            except OSError as exc:  # a read-only checkpoint store must not fail the eval
                print(f"eglp eval: could not write {out}: {exc}", file=sys.stderr)
        sys.stdout.flush()
    return 0


def _plain_shards(value) -> Any:
    return value if isinstance(value, str) else [str(v) for v in value]


__all__ = ["Prediction", "EvalMetrics", "TargetMetrics", "eval_mode", "iter_predictions", "evaluate",
           "evaluate_targets", "average_miou", "results_dict", "format_targets",
           "eval_json_path", "run_cli"]
