"""`eglp score --pred DIR --gt DIR`: mIoU of exported predictions against label PNGs.

Files are matched by sample key: the file stem without the dataset's suffix
(``_leftImg8bit``, ``_gtFine_labelTrainIds``, ``_rgb_anon``, ``_gt_labelIds``, ...), so a
Cityscapes/ACDC prediction ``X_leftImg8bit.png`` meets its label ``X_gtFine_labelIds.png``.
Each side is read as trainIds or Cityscapes labelIds: from the file name where it says so
(``labelTrainIds`` / ``labelIds``), else from the values (any value in 19..254 means labelIds).
Missing files and size mismatches are listed, not fatal; the score covers the matched pairs.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

from eglp_dist.data.labels import CITYSCAPES_ID_TO_TRAIN, IGNORE_INDEX, NUM_CLASSES
from eglp_dist.errors import DataError
from eglp_dist.metrics import confusion_matrix, format_table, metrics_from_confusion

_SUFFIX = re.compile(r"(_leftImg8bit|_rgb_anon|_rgb|_gtFine|_gtCoarse|_gt|_labelTrainIds|_labelIds|"
                     r"_trainIds|_train_id|_color|_pred)+$")


def sample_key(path: Path) -> str:
    return _SUFFIX.sub("", path.stem)


def _index(folder: Path) -> Dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    found: Dict[str, Path] = {}
    for p in sorted(folder.rglob("*.png")):
        if "color" in p.stem.lower() and "labelIds" not in p.stem:
            continue  # Cityscapes ships *_color.png beside the id images
        found.setdefault(sample_key(p), p)
    return found


def read_train_ids(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise DataError(f"{path}: cannot read image: {exc}") from exc
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a single-channel id image, got shape {arr.shape}")
    arr = arr.astype(np.int64)
    name = path.stem
    is_label_ids = "labelIds" in name or (
        "labelTrainIds" not in name and bool(((arr >= NUM_CLASSES) & (arr != IGNORE_INDEX)).any()))
    return CITYSCAPES_ID_TO_TRAIN[arr] if is_label_ids else arr


def score_folders(pred_dir: Path, gt_dir: Path) -> Tuple[np.ndarray, Dict[str, List[str]]]:
    preds, gts = _index(pred_dir), _index(gt_dir)
    problems: Dict[str, List[str]] = {"missing_prediction": [], "unmatched_prediction": [], "size_mismatch": []}
    matrix = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    import torch

    for key, gt_path in gts.items():
        if key not in preds:
            problems["missing_prediction"].append(str(gt_path))
            continue
        pred, gt = read_train_ids(preds[key]), read_train_ids(gt_path)
        if pred.shape != gt.shape:
            problems["size_mismatch"].append(f"{preds[key]}: {pred.shape[::-1]} vs {gt_path}: {gt.shape[::-1]}")
            continue
        matrix += confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt)).numpy()
    problems["unmatched_prediction"] = [str(p) for k, p in preds.items() if k not in gts]
    return matrix, problems


def score_cli(args: argparse.Namespace) -> int:
    matrix, problems = score_folders(Path(args.pred), Path(args.gt))
    for kind, items in problems.items():
        if items:
            print(f"{kind.replace('_', ' ')}: {len(items)}", file=sys.stderr)
            for item in items[:20]:
                print(f"  {item}", file=sys.stderr)
            if len(items) > 20:
                print(f"  ... and {len(items) - 20} more", file=sys.stderr)
    if matrix.sum() == 0:
        raise DataError(f"no prediction in {args.pred} matched a label in {args.gt}")
    metrics = metrics_from_confusion(matrix)
    print(format_table(metrics))
    if args.json:
        out = dict(metrics.as_dict(), **{k: v for k, v in problems.items()})
        tmp = Path(args.json).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(out, indent=2))
        tmp.replace(args.json)
    return 0
