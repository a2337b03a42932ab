"""Distributed inference and mIoU (``eglp eval``), and the CLI setup ``eglp predict`` shares.

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
uses :func:`iter_predictions` and :func:`cli_session` from here, so that both commands
compute and load alike. The training loop uses::

    metrics = evaluate(model, loader, device, num_classes, autocast_dtype)  # SegMetrics
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from eglp_dist.atomic import write_text_atomic
from eglp_dist.data.labels import CLASSES, NUM_CLASSES
from eglp_dist.dist.engine import autocast, autocast_dtype
from eglp_dist.errors import DataError
from eglp_dist.metrics import ConfusionMeter, SegMetrics, format_table, metrics_from_confusion
from eglp_dist.weights import load_into, load_weights, resolve_checkpoint_dir

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
                img = batch["img"].to(device, non_blocking=True)
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
    if not getattr(loader, "with_labels", True):
        # Decided from the manifest, so every rank raises alike (none waits in the reduce).
        name = getattr(loader, "name", "eval")
        raise DataError(f"data.{name}: {getattr(getattr(loader, 'manifest', None), 'folder', 'the loader')} "
                        f"has no labels (or with_labels=false); cannot compute mIoU")
    device = torch.device(device)
    meter = ConfusionMeter(num_classes, device=device)
    for p in iter_predictions(model, loader, device, autocast_dtype, max_batches):
        meter.update(p.pred, p.seg)
    matrix = meter.reduce()
    m = metrics_from_confusion(matrix)
    return EvalMetrics(iou=m.iou, acc=m.acc, overall_acc=m.overall_acc, confusion=matrix)


# ----------------------------------------------------------------------------- CLI


@dataclass
class CliSession:
    """What ``eglp eval`` and ``eglp predict`` run with: the config, this rank's launch
    environment and device, the model with the checkpoint's weights, on that device."""

    cfg: Any
    env: Any
    device: torch.device
    model: nn.Module
    owns_group: bool  # the process group was created here (and is ended here)
    checkpoint: Path  # the weight file or resolved iter_XXXXXXX folder the weights came from
    amp: Optional[torch.dtype]

    def eval_loader(self, stream: Any, name: str):
        """This rank's share of an eval stream (``cfg.data.val``/``test``), batch 1."""
        from eglp_dist.data.loader import build_eval_loader

        return build_eval_loader(stream, self.cfg.data, self.env.rank, self.env.world_size, self.device,
                                 name=name)


def _open_session(args: argparse.Namespace) -> CliSession:
    """Config, weights and model (all before any process group, so bad input fails fast on
    every rank alike), then the process group and this rank's device."""
    from omegaconf import OmegaConf

    import torch.distributed as tdist

    from eglp_dist.config import load_config
    from eglp_dist.dist.env import detect_env, init_distributed
    from eglp_dist.models import build_segmentor

    cfg = load_config(args.config, list(args.overrides or []))
    ckpt = Path(args.checkpoint)
    where = ckpt if ckpt.is_file() else resolve_checkpoint_dir(ckpt)
    state = load_weights(where)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg["pretrained"] = None  # every weight comes from the checkpoint
    model = build_segmentor(model_cfg)
    load_into(model, state, str(where))
    env = detect_env(local_rank_arg=getattr(args, "local_rank", None))
    owns_group = not tdist.is_initialized()
    device = init_distributed(env, cfg.dist.backend, cfg.dist.timeout_s)
    model.to(device)
    return CliSession(cfg, env, device, model, owns_group, where,
                      autocast_dtype(cfg.engine.precision, device))


@contextlib.contextmanager
def cli_session(args: argparse.Namespace) -> Iterator[CliSession]:
    """The setup of ``eglp eval`` / ``eglp predict`` (``args``: config, checkpoint, overrides,
    local_rank) for the block; a process group it created is shut down afterwards."""
    from eglp_dist.dist.env import shutdown

    session = _open_session(args)
    try:
        yield session
    finally:
        if session.owns_group:
            shutdown()


def eval_json_path(checkpoint: Path, split: str = "val") -> Path:
    """``<checkpoint folder>/eval_val.json``; next to a weight file: ``<stem>.eval_val.json``."""
    if checkpoint.is_file():
        return checkpoint.with_name(f"{checkpoint.stem}.eval_{split}.json")
    return checkpoint / f"eval_{split}.json"


def run_cli(args: argparse.Namespace) -> int:
    """``eglp eval CONFIG CHECKPOINT [overrides]``: mIoU over ``cfg.data.val`` on all ranks;
    rank 0 prints the table and writes ``<checkpoint>/eval_val.json``."""
    with cli_session(args) as session:
        cfg, env = session.cfg, session.env
        loader = session.eval_loader(cfg.data.val, "val")
        metrics = evaluate(session.model, loader, session.device, cfg.model.num_classes, session.amp)
        if env.is_main:
            classes = CLASSES if cfg.model.num_classes == NUM_CLASSES else \
                [str(i) for i in range(cfg.model.num_classes)]
            print(f"{loader.manifest.data['dataset']} {loader.manifest.data['split']} "
                  f"({len(loader.manifest)} images, {env.world_size} rank(s)), {session.checkpoint}")
            print(format_table(metrics, classes))
            result = dict(metrics.as_dict(classes), checkpoint=str(session.checkpoint),
                          config=str(args.config), shards=str(cfg.data.val.shards),
                          dataset=loader.manifest.data["dataset"], split=loader.manifest.data["split"],
                          num_images=len(loader.manifest),
                          num_pixels=int(metrics.confusion.sum()))
            out = eval_json_path(session.checkpoint)
            try:
                write_text_atomic(out, json.dumps(result, indent=2) + "\n")
                print(f"wrote {out}")
            except OSError as exc:  # a read-only checkpoint store must not fail the eval
                print(f"eglp eval: could not write {out}: {exc}", file=sys.stderr)
        sys.stdout.flush()
    return 0


__all__ = ["Prediction", "EvalMetrics", "eval_mode", "iter_predictions", "evaluate", "CliSession",
           "cli_session", "eval_json_path", "run_cli"]
