"""Distributed evaluation (``eglp eval``) and prediction export (``eglp predict``).

One inference path, :func:`iter_predictions`, serves both: each image of this rank's share
(``build_eval_loader``: resized to ``img_scale``, batch 1) goes through ``model(img)`` (the
segmentor's ``infer``: sliding test windows where configured), the logits are resized
bilinearly to the image's *original* size (MMSeg semantics) and the argmax is yielded with
the sample's meta. :func:`evaluate` accumulates a confusion matrix from it and all-reduces it
once at the end (ranks may hold one sample more or less than each other, so nothing
collective may run per image); :func:`predict_cli` writes the same predictions as PNGs in the
benchmark servers' naming (see docs/evaluate.md for the conventions and their sources).

The training loop uses::

    metrics = evaluate(model, loader, device, num_classes, autocast_dtype)  # SegMetrics
    state_dict = load_weights("runs/x/checkpoints/latest")                  # fp32, plain keys
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from eglp_dist.data.labels import CLASSES, NUM_CLASSES, TRAIN_TO_CITYSCAPES_ID, colorize
from eglp_dist.dist import comm
from eglp_dist.errors import DataError
from eglp_dist.metrics import ConfusionMeter, SegMetrics, format_table, metrics_from_confusion

FORMATS = ("trainid", "labelid", "color")

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


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


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
                    with _autocast(device, autocast_dtype):
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


# ----------------------------------------------------------------------------- weights

_COMPLETE = "COMPLETE"
_ITER_RE = re.compile(r"^iter_\d+$")


def _fp32(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _read_weight_file(path: Path) -> Dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(f"{path}: cannot be read as a tensor-only weight file "
                        f"({type(exc).__name__}: {first})") from None
    for container in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(container), dict):
            obj = obj[container]
            break
    if not isinstance(obj, dict) or not obj:
        raise DataError(f"{path}: not a state dict (found {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise DataError(f"{path}: entry {bad[0]!r} is not a tensor; not a state dict")
    if all(k.startswith("module.") for k in obj):  # saved from a DDP wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return _fp32(obj)


def resolve_checkpoint_dir(checkpoint: os.PathLike | str) -> Path:
    """The complete ``iter_XXXXXXX`` folder a user path means: that folder itself, a run's
    ``checkpoints/`` folder or its ``latest`` link (-> newest complete one), or a run folder
    holding ``checkpoints/``. DataError naming the path otherwise."""
    from eglp_dist.dist.checkpoint import find_latest

    p = Path(checkpoint)
    if p.is_symlink() and not p.exists():  # dangling `latest`: scan its folder instead
        found = find_latest(p.parent)
        if found is None:
            raise DataError(f"{p}: dangling link and {p.parent} holds no complete checkpoint")
        return found
    if not p.exists():
        raise DataError(f"{p}: no such checkpoint folder or weight file")
    if not p.is_dir():
        raise DataError(f"{p}: not a folder")
    if (p / _COMPLETE).is_file():
        return p.resolve()
    if _ITER_RE.match(p.name) or (p / "engines").is_dir():
        raise DataError(f"{p}: no {_COMPLETE} marker: the checkpoint was not completely saved "
                        f"(interrupted run?); use an earlier one or the run's checkpoints/ folder")
    for root in (p, p / "checkpoints"):
        found = find_latest(root)
        if found is not None:
            return found
    raise DataError(f"{p}: not a checkpoint folder (no {_COMPLETE} marker) and holds no complete "
                    f"iter_XXXXXXX checkpoint")


def load_weights(checkpoint: os.PathLike | str, engine: str = "student") -> Dict[str, torch.Tensor]:
    """A plain fp32 state_dict for ``build_segmentor(cfg.model).load_state_dict``.

    ``checkpoint``: a complete checkpoint folder (``iter_XXXXXXX`` with ``COMPLETE``), a run's
    ``checkpoints/`` folder or its ``latest`` link (the newest complete checkpoint), or a
    ``.pt``/``.pth`` state_dict file (bare or under ``state_dict``/``model``). From a folder,
    ``engines/<engine>/`` is exported whatever engine wrote it (DDP ``engine.pt`` or a
    DeepSpeed ZeRO folder, ``export_fp32``); a name that is no engine but a plain module of
    the checkpoint (an EMA teacher in ``modules.pt``) is read from there. Needs no process
    group. Errors are DataErrors naming the path and the problem.
    """
    from eglp_dist.dist.engine import export_fp32

    p = Path(checkpoint)
    if p.is_file():
        return _read_weight_file(p)
    folder = resolve_checkpoint_dir(p)
    engine_dir = folder / "engines" / engine
    if engine_dir.is_dir():
        try:
            return _fp32(export_fp32(engine_dir))
        except FileNotFoundError as exc:
            raise DataError(str(exc)) from None
    engines = sorted(d.name for d in (folder / "engines").iterdir() if d.is_dir()) \
        if (folder / "engines").is_dir() else []
    modules: List[str] = []
    if (folder / "modules.pt").is_file():
        state = torch.load(folder / "modules.pt", map_location="cpu", weights_only=False)
        if engine in state:
            return _fp32(state[engine])
        modules = sorted(state)
    raise DataError(f"{folder}: no engine {engine!r} (engines: {', '.join(engines) or 'none'}; "
                    f"plain modules: {', '.join(modules) or 'none'})")


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], origin: str) -> None:
    """Strict ``load_state_dict`` whose mismatch is a DataError listing a few keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def few(items: List[str]) -> str:
            return ", ".join(items[:5]) + (f" ... (+{len(items) - 5})" if len(items) > 5 else "")

        parts = [f"{name} {len(items)}: {few(items)}" for name, items in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if items]
        raise DataError(f"{origin}: weights do not fit the config's model ({'; '.join(parts)}); "
                        f"was it trained with another model config?")
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------- naming

# Datasets whose servers take one flat folder per submission part (ACDC: one zip of
# trainId PNGs; Dark Zurich: labelTrainIds/ + labelTrainIds_invalid/ + confidence/), named
# after the image file. Everything else mirrors the sub-path below the split's image folder
# (Cityscapes' server and cityscapesScripts search recursively for city_seq_frame*.png).
FLAT_DATASETS = ("acdc", "acdc_fog", "acdc_rain", "acdc_snow", "dark_zurich")
FORMAT_FOLDER = {"trainid": "labelTrainIds", "labelid": "labelIds", "color": "color"}


def _strip_image_dir(source: str, dataset: str, split: str) -> str:
    """``leftImg8bit/val/aachen/x.png`` -> ``aachen/x.png``: the path below the split's image
    folder of the dataset's layout (the source path itself if no template matches)."""
    from eglp_dist.data.layouts import LAYOUTS

    layout = LAYOUTS.get(dataset)
    if layout is not None:
        try:
            prefixes = [t.format(split=layout.split_dir(split), condition=layout.condition).rstrip("/") + "/"
                        for t in layout.image_dirs]
        except (DataError, KeyError):
            prefixes = []
        for prefix in prefixes:
            if source.startswith(prefix):
                return source[len(prefix):]
    return source


def prediction_paths(meta: Mapping[str, Any], fmt: str = "trainid") -> Dict[str, str]:
    """Where one image's prediction files go, relative to ``--out``: ``{part: path}`` with
    parts ``pred`` (always), and ``confidence`` / ``invalid`` for Dark Zurich trainIds.

    The file name is the image's own (``X_leftImg8bit.png``, ``X_rgb_anon.png``; any other
    extension becomes ``.png``), which every server matches on.
    """
    source = str(meta["source"])
    dataset = str(meta.get("dataset", ""))
    name = Path(source).with_suffix(".png").name
    if dataset in FLAT_DATASETS:
        out = {"pred": f"{FORMAT_FOLDER[fmt]}/{name}"}
        if dataset == "dark_zurich" and fmt == "trainid":
            out["invalid"] = f"labelTrainIds_invalid/{name}"
            out["confidence"] = f"confidence/{name}"
        return out
    sub = _strip_image_dir(source, dataset, str(meta.get("split", "")))
    return {"pred": str(Path(sub).with_suffix(".png").as_posix())}


def encode_prediction(pred: np.ndarray, fmt: str) -> np.ndarray:
    """trainIds [H, W] -> the array written for ``fmt``: uint8 trainIds, uint8 Cityscapes
    labelIds, or uint8 RGB [H, W, 3] in the Cityscapes palette."""
    pred = pred.astype(np.uint8, copy=False)
    if fmt == "trainid":
        return pred
    if fmt == "labelid":
        return TRAIN_TO_CITYSCAPES_ID[pred]
    if fmt == "color":
        return colorize(pred)
    raise DataError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def write_png_atomic(path: Path, arr: np.ndarray) -> None:
    """Write a PNG via a hidden temporary in the same folder and a rename, so an interrupted
    run leaves either the whole file or none (and no ``*.png`` a server would pick up)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        Image.fromarray(arr).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class PredictionWriter:
    """Writes predictions of one split into ``out`` (each rank its own share)."""

    def __init__(self, out: os.PathLike | str, fmt: str = "trainid"):
        if fmt not in FORMATS:
            raise DataError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.out, self.fmt = Path(out), fmt
        self.images = 0
        self.files = 0

    def needs_confidence(self, meta: Mapping[str, Any]) -> bool:
        return "confidence" in prediction_paths(meta, self.fmt)

    def check_names(self, samples: List[Mapping[str, Any]]) -> None:
        """DataError if two samples would write the same file (flat layouts drop folders).
        Run on every rank over the whole manifest, so all ranks agree before writing."""
        seen: Dict[str, str] = {}
        for s in samples:
            rel = prediction_paths(s, self.fmt)["pred"]
            if rel in seen:
                raise DataError(f"{self.out}: {s['source']} and {seen[rel]} would both be written "
                                f"to {rel}")
            seen[rel] = str(s["source"])

    def write(self, p: Prediction) -> None:
        paths = prediction_paths(p.meta, self.fmt)
        pred = p.pred.to("cpu", torch.uint8).numpy()
        write_png_atomic(self.out / paths["pred"], encode_prediction(pred, self.fmt))
        if "invalid" in paths:
            # No pixel is declared invalid: Dark Zurich's UIoU then equals the IoU.
            write_png_atomic(self.out / paths["invalid"], pred)
        if "confidence" in paths:
            if p.confidence is None:
                raise ValueError("Dark Zurich export needs confidences (with_confidence=True)")
            conf = (p.confidence.float().clamp(0, 1) * 65535).round().to("cpu", torch.int32).numpy()
            write_png_atomic(self.out / paths["confidence"], conf.astype(np.uint16))
        self.images += 1
        self.files += len(paths)


# ----------------------------------------------------------------------------- CLI


@dataclass
class _Setup:
    cfg: Any
    env: Any
    device: torch.device
    model: nn.Module
    owns_group: bool
    checkpoint: Path
    amp: Optional[torch.dtype]


def _setup(args: argparse.Namespace) -> _Setup:
    """Config, weights and model (all before any process group, so bad input fails fast on
    every rank alike), then the process group and this rank's device."""
    from omegaconf import OmegaConf

    import torch.distributed as tdist

    from eglp_dist.config import load_config
    from eglp_dist.dist.engine import autocast_dtype
    from eglp_dist.dist.env import detect_env, init_distributed
    from eglp_dist.models import build_segmentor

    cfg = load_config(args.config, list(args.overrides or []))
    ckpt = Path(args.checkpoint)
    state = load_weights(ckpt)
    where = ckpt if ckpt.is_file() else resolve_checkpoint_dir(ckpt)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg["pretrained"] = None  # every weight comes from the checkpoint
    model = build_segmentor(model_cfg)
    load_into(model, state, str(where))
    env = detect_env(local_rank_arg=getattr(args, "local_rank", None))
    owns_group = not tdist.is_initialized()
    device = init_distributed(env, cfg.dist.backend, cfg.dist.timeout_s)
    model.to(device)
    return _Setup(cfg, env, device, model, owns_group, where,
                  autocast_dtype(cfg.engine.precision, device))


def _teardown(setup: Optional[_Setup]) -> None:
    from eglp_dist.dist.env import shutdown

    if setup is not None and setup.owns_group:
        shutdown()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def eval_json_path(checkpoint: Path, split: str = "val") -> Path:
    """``<checkpoint folder>/eval_val.json``; next to a weight file: ``<stem>.eval_val.json``."""
    if checkpoint.is_file():
        return checkpoint.with_name(f"{checkpoint.stem}.eval_{split}.json")
    return checkpoint / f"eval_{split}.json"


def run_cli(args: argparse.Namespace) -> int:
    """``eglp eval CONFIG CHECKPOINT [overrides]``: mIoU over ``cfg.data.val`` on all ranks;
    rank 0 prints the table and writes ``<checkpoint>/eval_val.json``."""
    from eglp_dist.data.loader import build_eval_loader

    setup = None
    try:
        setup = _setup(args)
        cfg, env = setup.cfg, setup.env
        loader = build_eval_loader(cfg.data.val, cfg.data, env.rank, env.world_size, setup.device, name="val")
        metrics = evaluate(setup.model, loader, setup.device, cfg.model.num_classes, setup.amp)
        if env.is_main:
            classes = CLASSES if cfg.model.num_classes == NUM_CLASSES else \
                [str(i) for i in range(cfg.model.num_classes)]
            print(f"{loader.manifest.data['dataset']} {loader.manifest.data['split']} "
                  f"({len(loader.manifest)} images, {env.world_size} rank(s)), {setup.checkpoint}")
            print(format_table(metrics, classes))
            result = dict(metrics.as_dict(classes), checkpoint=str(setup.checkpoint),
                          config=str(args.config), shards=str(cfg.data.val.shards),
                          dataset=loader.manifest.data["dataset"], split=loader.manifest.data["split"],
                          num_images=len(loader.manifest),
                          num_pixels=int(metrics.confusion.sum()))
            out = eval_json_path(setup.checkpoint)
            try:
                _write_json_atomic(out, result)
                print(f"wrote {out}")
            except OSError as exc:  # a read-only checkpoint store must not fail the eval
                print(f"eglp eval: could not write {out}: {exc}", file=sys.stderr)
        sys.stdout.flush()
    finally:
        _teardown(setup)
    return 0


def predict_cli(args: argparse.Namespace) -> int:
    """``eglp predict CONFIG CHECKPOINT [overrides] --split val|test --out DIR --format F``:
    every rank writes the PNGs of its share; rank 0 prints the total."""
    from eglp_dist.data.loader import build_eval_loader

    split = getattr(args, "split", "val")
    writer = PredictionWriter(args.out, getattr(args, "format", "trainid"))
    setup = None
    try:
        setup = _setup(args)
        cfg, env = setup.cfg, setup.env
        stream = cfg.data.val if split == "val" else cfg.data.test
        loader = build_eval_loader(stream, cfg.data, env.rank, env.world_size, setup.device, name=split)
        samples = [dict(s, dataset=loader.manifest.data["dataset"], split=loader.manifest.data["split"])
                   for s in loader.manifest.data["samples"]]
        writer.check_names(samples)
        if env.is_main and writer.out.is_dir() and any(writer.out.iterdir()):
            print(f"eglp predict: {writer.out} is not empty; files of the same name are replaced",
                  file=sys.stderr)
        comm.barrier()  # (so that the look above never sees another rank's new files)
        conf = bool(samples) and writer.needs_confidence(samples[0])
        for p in iter_predictions(setup.model, loader, setup.device, setup.amp, with_confidence=conf):
            writer.write(p)
        counts = comm.all_reduce_sum(torch.tensor([writer.images, writer.files], dtype=torch.int64,
                                                  device=setup.device)).tolist()
        if env.is_main:
            print(f"wrote {counts[1]} files for {counts[0]} images "
                  f"({loader.manifest.data['dataset']} {loader.manifest.data['split']}, "
                  f"format {writer.fmt}) to {writer.out}")
        sys.stdout.flush()
    finally:
        _teardown(setup)
    return 0


__all__ = ["Prediction", "EvalMetrics", "iter_predictions", "evaluate", "load_weights",
           "resolve_checkpoint_dir", "load_into", "prediction_paths", "encode_prediction",
           "PredictionWriter", "run_cli", "predict_cli"]
