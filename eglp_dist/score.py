"""`eglp score --pred DIR --gt DIR`: mIoU of exported predictions against label PNGs.

Files are matched by sample key: the file stem without the dataset's suffix
(``_leftImg8bit``, ``_gtFine_labelTrainIds``, ``_rgb_anon``, ``_gt_labelIds``, ...), so a
Cityscapes/ACDC prediction ``X_leftImg8bit.png`` meets its label ``X_gtFine_labelIds.png``;
a Cityscapes-style name (``city_123456_123456_...``) is matched on ``city_123456_123456``
alone, as cityscapesScripts does, so Foggy/Rain Cityscapes names match too. Companion files
of the label folders (``*_color``, ``*_labelColor``, ``*_instanceIds``, ``*_invIds``, ...) and
Dark Zurich's ``confidence/`` and ``labelTrainIds_invalid/`` submission folders are skipped.

Each side is read as trainIds or Cityscapes labelIds: from the file name where it says so
(``labelTrainIds`` / ``labelIds``), else from the values (any value in 19..254 means
labelIds). A file whose name says nothing and whose values are all below 19 (or 255) fits
both; it is read the way most of its folder's decided files are (trainIds if none is), so
a labelId prediction that happens to hold only road/sidewalk/building... is not misread.
Missing, unreadable and mis-sized predictions are listed and are an error unless the user
accepts a score of the matched pairs (``--allow-missing``); a sample key that two files share
(e.g. ``--gt`` above ACDC's ``train/`` and ``val/``) is always an error; the output says how
many label images the score covers.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from eglp_dist.atomic import write_text_atomic
from eglp_dist.data.labels import CITYSCAPES_ID_TO_TRAIN, IGNORE_INDEX, NUM_CLASSES
from eglp_dist.errors import DataError
from eglp_dist.metrics import confusion_matrix, format_table, metrics_from_confusion

_SUFFIX = re.compile(r"(_leftImg8bit|_rgb_anon|_rgb|_gtFine|_gtCoarse|_gt|_labelTrainIds|_labelIds|"
                     r"_trainIds|_train_id|_color|_pred)+$")
# cityscapesScripts' key: <city>_<sequence:6>_<frame:6> at the start of any of its file names.
_CITYSCAPES_KEY = re.compile(r"^([^_]+_\d{6}_\d{6})(?:_|$)")
# Files beside the id images in the published label folders: colour renderings, instance
# ids, ACDC/Dark Zurich invalid masks, polygons.
_COMPANION = re.compile(r"(_color|_labelColor|_instanceIds|_invIds|_invGray|_polygons|_panoptic)$",
                        re.IGNORECASE)
# Dark Zurich submission folders that are not the labels themselves.
_SKIP_DIRS = ("confidence", "labelTrainIds_invalid")

TRAIN, LABEL = "train", "label"


def sample_key(path: Path) -> str:
    m = _CITYSCAPES_KEY.match(path.stem)
    if m:
        return m.group(1)
    return _SUFFIX.sub("", path.stem)


def _index(folder: Path) -> Tuple[Dict[str, Path], List[str]]:
    """({sample key: file}, ["key: file, file"] for keys that files in two or more folders
    share, e.g. a --gt folder above ACDC's train/ and val/, whose file names repeat: such keys
    are left out of the mapping, never resolved by whichever file sorts first). Files of one
    key in one folder are one sample in several encodings (Cityscapes' ``_labelIds`` beside
    ``_labelTrainIds``): the first in name order is read, as before."""
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    found: Dict[str, List[Path]] = {}
    for p in sorted(folder.rglob("*.png")):
        if _COMPANION.search(p.stem) or p.name.startswith("."):
            continue  # *_color.png etc. beside the id images; hidden temporaries
        if any(part in _SKIP_DIRS for part in p.relative_to(folder).parts[:-1]):
            continue
        found.setdefault(sample_key(p), []).append(p)
    unique = {k: v[0] for k, v in found.items() if len({p.parent for p in v}) == 1}
    shared = [f"{k}: {', '.join(map(str, v))}" for k, v in found.items() if k not in unique]
    return unique, shared


def _read_ids(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise DataError(f"{path}: cannot read image: {exc}") from exc
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a single-channel id image, got shape {arr.shape}")
    return arr.astype(np.int64)


def _encoding(path: Path, arr: np.ndarray) -> Optional[str]:
    """TRAIN or LABEL where the name or the values decide, None where both fit."""
    name = path.stem
    if "labelIds" in name:
        return LABEL
    if "labelTrainIds" in name or "trainIds" in name or "train_id" in name:
        return TRAIN
    if bool(((arr >= NUM_CLASSES) & (arr != IGNORE_INDEX)).any()):
        return LABEL
    return None


def _to_train(arr: np.ndarray, encoding: str) -> np.ndarray:
    return CITYSCAPES_ID_TO_TRAIN[np.clip(arr, 0, 255)] if encoding == LABEL else arr


def read_train_ids(path: Path) -> np.ndarray:
    """One id image as trainIds, its encoding decided from this file alone (name, values)."""
    arr = _read_ids(path)
    return _to_train(arr, _encoding(path, arr) or TRAIN)


def score_folders(pred_dir: Path, gt_dir: Path) -> Tuple[np.ndarray, Dict[str, List[str]], int]:
    """(19x19 confusion matrix over the matched pairs, {problem kind: [descriptions]}, number
    of label images scored)."""
    import torch

    (preds, pred_shared), (gts, gt_shared) = _index(Path(pred_dir)), _index(Path(gt_dir))
    problems: Dict[str, List[str]] = {"ambiguous_label": gt_shared, "ambiguous_prediction": pred_shared,
                                      "missing_prediction": [], "unmatched_prediction": [],
                                      "size_mismatch": [], "unreadable": []}
    # One matrix per (prediction encoding, label encoding); "?x" = a file that fits both,
    # read as x; folder-wide choice for those at the end.
    sums: Dict[Tuple[str, str], np.ndarray] = {}
    decided = {"pred": {TRAIN: 0, LABEL: 0}, "gt": {TRAIN: 0, LABEL: 0}}
    scored = 0

    def options(side: str, path: Path, arr: np.ndarray) -> List[str]:
        enc = _encoding(path, arr)
        if enc is not None:
            decided[side][enc] += 1
            return [enc]
        return ["?" + TRAIN, "?" + LABEL]

    for key, gt_path in gts.items():
        if key not in preds:
            problems["missing_prediction"].append(str(gt_path))
            continue
        try:
            pred, gt = _read_ids(preds[key]), _read_ids(gt_path)
        except DataError as exc:
            problems["unreadable"].append(str(exc))
            continue
        if pred.shape != gt.shape:
            problems["size_mismatch"].append(f"{preds[key]}: {pred.shape[::-1]} vs {gt_path}: {gt.shape[::-1]}")
            continue
        gt_options = options("gt", gt_path, gt)
        for pe in options("pred", preds[key], pred):
            p = torch.from_numpy(_to_train(pred, pe.lstrip("?")))
            for ge in gt_options:
                g = torch.from_numpy(_to_train(gt, ge.lstrip("?")))
                m = confusion_matrix(p, g).numpy()
                sums[(pe, ge)] = sums[(pe, ge)] + m if (pe, ge) in sums else m
        scored += 1
    problems["unmatched_prediction"] = [str(p) for k, p in preds.items() if k not in gts]

    def folder_choice(side: str) -> str:
        return LABEL if decided[side][LABEL] > decided[side][TRAIN] else TRAIN

    wanted = {"pred": folder_choice("pred"), "gt": folder_choice("gt")}
    matrix = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for (pe, ge), m in sums.items():
        if pe.lstrip("?") != pe and pe != "?" + wanted["pred"]:
            continue
        if ge.lstrip("?") != ge and ge != "?" + wanted["gt"]:
            continue
        matrix += m
    return matrix, problems, scored


# Problems that make the score describe fewer images than the label folder holds (or the
# wrong ones): errors unless the user accepts a partial score with --allow-missing.
# Ambiguous keys are errors always: no flag makes "which of two labels" answerable.
PARTIAL = ("missing_prediction", "size_mismatch", "unreadable")
AMBIGUOUS = ("ambiguous_label", "ambiguous_prediction")


def score_cli(args: argparse.Namespace) -> int:
    matrix, problems, scored = score_folders(Path(args.pred), Path(args.gt))
    for kind, items in problems.items():
        if items:
            print(f"{kind.replace('_', ' ')}: {len(items)}", file=sys.stderr)
            for item in items[:20]:
                print(f"  {item}", file=sys.stderr)
            if len(items) > 20:
                print(f"  ... and {len(items) - 20} more", file=sys.stderr)
    for kind in AMBIGUOUS:
        if problems[kind]:
            raise DataError(f"{len(problems[kind])} sample key(s) name two or more files ({kind.replace('_', ' ')}, "
                            f"e.g. {problems[kind][0]}): point --pred/--gt at one split's folder")
    if scored == 0:
        raise DataError(f"no prediction in {args.pred} matched a label in {args.gt}")
    labels = sum(len(problems[k]) for k in PARTIAL) + scored
    partial = {k: len(problems[k]) for k in PARTIAL if problems[k]}
    if partial and not args.allow_missing:
        listing = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in partial.items())
        raise DataError(f"only {scored} of {labels} label images in {args.gt} can be "
                        f"scored ({listing}; listed above); a partial mIoU is not the split's mIoU. "
                        f"Pass --allow-missing to score the matched subset anyway")
    metrics = metrics_from_confusion(matrix)
    print(format_table(metrics))
    print(f"images scored: {scored} of {labels} label images in {args.gt}"
          + (" (PARTIAL: --allow-missing)" if scored < labels else ""))
    if args.json:
        out = dict(metrics.as_dict(), images_scored=scored, label_images=labels,
                   **{k: v for k, v in problems.items()})
        write_text_atomic(args.json, json.dumps(out, indent=2))
    return 0
