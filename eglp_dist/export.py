"""Prediction files for the benchmark servers (``eglp predict``): where each image's PNGs
go, what they hold, and writing them safely.

Split off from ``evaluate.py`` because the servers' conventions (file names, folder
layouts, label encodings; see docs/evaluate.md for each and its source) change for reasons
of their own, unrelated to how predictions are computed or scored. Inference itself is
``evaluate.iter_predictions`` (the same path ``eglp eval`` scores) and the config /
checkpoint / process-group setup is ``evaluate.cli_session``, shared with ``eglp eval``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping

import numpy as np
import torch

from eglp_dist.atomic import atomic_path
from eglp_dist.data.labels import TRAIN_TO_CITYSCAPES_ID, colorize
from eglp_dist.runtime import comm
from eglp_dist.errors import ConfigError, DataError
from eglp_dist.cli_session import cli_session, eval_targets
from eglp_dist.evaluate import Prediction, iter_predictions

FORMATS = ("trainid", "labelid", "color")

# Datasets whose servers take one flat folder per submission part (ACDC: one zip of
# trainId PNGs; Dark Zurich: labelTrainIds/ + labelTrainIds_invalid/ + confidence/), named
# after the image file. Everything else mirrors the sub-path below the split's image folder
# (Cityscapes' server and cityscapesScripts search recursively for city_seq_frame*.png).
FLAT_DATASETS = ("acdc", "acdc_fog", "acdc_rain", "acdc_snow", "dark_zurich")
FORMAT_FOLDER = {"trainid": "labelTrainIds", "labelid": "labelIds", "color": "color"}


def _strip_image_dir(source: str, dataset: str, split: str) -> str:
    """``leftImg8bit/val/aachen/x.png`` -> ``aachen/x.png``: the path below the split's image
    folder of the dataset's layout (the source path itself if no template matches)."""
    from eglp_dist.data.offline.layouts import LAYOUTS

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

    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


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


def predict_cli(args: argparse.Namespace) -> int:
    """``eglp predict CONFIG CHECKPOINT [overrides] --split val|test --out DIR --format F``:
    every rank writes the PNGs of its share; rank 0 prints the total."""
    split = getattr(args, "split", "val")
    writer = PredictionWriter(args.out, getattr(args, "format", "trainid"))
    with cli_session(args) as session:
        cfg, env = session.cfg, session.env
        if split == "val":
            targets = eval_targets(cfg, [args.target] if getattr(args, "target", None) else None)
            if len(targets) > 1:
                raise ConfigError(f"data.val has {len(targets)} targets with shards "
                                  f"({', '.join(targets)}); choose one with --target NAME")
            (name, stream), = targets.items()
            loader = session.eval_loader(stream, f"val.{name}")
        else:
            loader = session.eval_loader(cfg.data.test, "test")
        samples = [dict({"dataset": loader.manifest.data["dataset"], "split": loader.manifest.data["split"]}, **s)
                   for s in loader.manifest.data["samples"]]  # (several folders: each sample's own)
        writer.check_names(samples)
        if env.is_main and writer.out.is_dir() and any(writer.out.iterdir()):
            print(f"eglp predict: {writer.out} is not empty; files of the same name are replaced",
                  file=sys.stderr)
        comm.barrier()  # (so that the look above never sees another rank's new files)
        conf = bool(samples) and writer.needs_confidence(samples[0])
        for p in iter_predictions(session.model, loader, session.device, session.amp, with_confidence=conf):
            writer.write(p)
        counts = comm.all_reduce_sum(torch.tensor([writer.images, writer.files], dtype=torch.int64,
                                                  device=session.device)).tolist()
        if env.is_main:
            print(f"wrote {counts[1]} files for {counts[0]} images "
                  f"({loader.manifest.data['dataset']} {loader.manifest.data['split']}, "
                  f"format {writer.fmt}) to {writer.out}")
        sys.stdout.flush()
    return 0


__all__ = ["FORMATS", "FLAT_DATASETS", "FORMAT_FOLDER", "prediction_paths", "encode_prediction",
           "write_png_atomic", "PredictionWriter", "predict_cli"]
