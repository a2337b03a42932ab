"""Synthetic street scenes in the real datasets' layouts: the embedded data of tests and the demo.

Why: the real datasets cannot be downloaded here, yet every path of the system (layouts,
packing, loaders, day->night adaptation, DNIS similarities, domain generalisation) must run
and be measurable on a CPU. So we draw scenes procedurally: a perspective road with
sidewalks, buildings, walls, fences, trees, terrain, poles with traffic lights and signs,
cars, trucks, buses, trams, persons and riders on two-wheelers, each class with its own
shapes, colours and textures. The *content* of a scene is a function of (seed, split,
index) only; the *style* decides how it is rendered:

- ``day``: the Cityscapes look.
- ``night``: classes change **unequally**, as in EGLP's motivation: the sky and buildings
  change a lot (black sky, dark facades with lit windows), lit objects glow (traffic lights,
  car lamps, street lamps), the road changes least, and there is dark sensor noise. Colours
  stay class-specific, so the shift is real but learnable by self-training.
- ``fog`` / ``rain``: the day render with depth-dependent fog, or darkening and rain streaks.
- ``game``: a GTA-like look (saturated palette, hard textures) for sim-to-real sources.

Everything is numpy-vectorised (object masks are drawn in their bounding boxes only), so
40 images of 1024x512 take seconds. ``write_dataset`` writes files named and encoded as the
real dataset stores them (e.g. Cityscapes labelIds and labelTrainIds, GTA5 palette label
ids, Synthia 16-bit ids), so ``eglp pack`` reads synthetic and real data with the same code.
"""
from __future__ import annotations

import io
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from eglp_dist.atomic import write_bytes_atomic
from eglp_dist.data import labels as L
from eglp_dist.data.codecs import encode_png16_rgb
from eglp_dist.data.offline.layouts import Layout, default_splits, get_layout
from eglp_dist.data.offline.synth_render import STYLES, night_change, render  # noqa: F401  (the synth API)
from eglp_dist.data.offline.synth_scene import MIN_SIZE, make_scene
from eglp_dist.errors import DataError


def sample(seed: int, split: str, index: int, size: Tuple[int, int], style: str,
           shift: float = 1.0) -> Tuple[np.ndarray, np.ndarray]:
    """(image uint8 [H, W, 3], trainIds uint8 [H, W]) of one synthetic sample.

    The content depends on (seed, split, index) only, so the same arguments with another
    style give the same scene in another domain (a day/night pair).
    """
    w, h = size
    split_code = zlib.crc32(split.encode())
    scene = make_scene(h, w, np.random.default_rng([seed, split_code, index]))
    day_rng = np.random.default_rng([seed, split_code, index, 0])  # textures: same in all styles
    rng = np.random.default_rng([seed, split_code, index, STYLES.index(style) + 1])
    return render(scene, style, rng, shift, day_rng), scene.label


def _inverse_lut(lut: np.ndarray, ignore_value: int) -> np.ndarray:
    """trainId -> one source id that maps to it (the first), ignore -> ``ignore_value``."""
    inv = np.full(256, ignore_value, dtype=np.int64)
    for src in range(len(lut) - 1, -1, -1):
        if lut[src] != L.IGNORE_INDEX:
            inv[lut[src]] = src
    return inv


_ENCODE = {  # encoding -> (trainId -> stored id, id of "ignore/void")
    "trainid": (np.arange(256), L.IGNORE_INDEX),
    "cityscapes": (_inverse_lut(L.CITYSCAPES_ID_TO_TRAIN, 0), 0),
    "synthia": (_inverse_lut(L.SYNTHIA_ID_TO_TRAIN[:256], 0), 0),
    "mapillary": (_inverse_lut(L.MAPILLARY_ID_TO_TRAIN, 65), 65),
}
_ENCODE = {k: (np.where(np.arange(256) == L.IGNORE_INDEX, v, lut), v)
           for k, (lut, v) in _ENCODE.items()}


def encode_label(train_ids: np.ndarray, encoding: str) -> bytes:
    """trainIds -> PNG bytes in a dataset's label encoding (as the real dataset stores it)."""
    lut, _ = _ENCODE[encoding]
    ids = lut[train_ids]
    if encoding == "synthia":
        rgb = np.zeros(ids.shape + (3,), np.uint16)
        rgb[..., 0] = ids
        return encode_png16_rgb(rgb)
    buf = io.BytesIO()
    if encoding in ("cityscapes", "mapillary"):  # palette PNGs, as GTA5 and Vistas ship them
        im = Image.fromarray(ids.astype(np.uint8), mode="P")
        train_of_id = L.ENCODINGS[encoding].lut[:256]
        im.putpalette(L.colorize(train_of_id[None])[0].ravel().tolist())
    else:
        im = Image.fromarray(ids.astype(np.uint8), mode="L")
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_image(img: np.ndarray, path: Path) -> bytes:
    buf = io.BytesIO()
    if path.suffix.lower() in (".jpg", ".jpeg"):
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
    else:
        Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_dataset(layout_name: str, out_dir, n: int = 40, splits: Optional[Sequence[str]] = None,
                  style: Optional[str] = None, size: Tuple[int, int] = (1024, 512), seed: int = 0,
                  progress: bool = False, shift: float = 1.0) -> Dict[str, List[Path]]:
    """Write ``n`` synthetic samples per split in a dataset's published layout.

    Returns {split: [image paths]}. Labelled splits get labels in the dataset's encoding
    (Cityscapes gets both labelTrainIds and labelIds); other splits get images only.
    ``shift`` scales the style's domain shift (see ``render``).
    """
    layout: Layout = get_layout(layout_name)
    style = style or layout.synth_style
    if style not in STYLES:
        raise DataError(f"unknown synthetic style {style!r} (known: {', '.join(STYLES)})")
    if n < 1:
        raise DataError(f"--n must be >= 1, got {n}")
    if len(size) != 2 or min(size) < MIN_SIZE:
        raise DataError(f"--size must be two numbers W H, each >= {MIN_SIZE}, got "
                        f"{' '.join(map(str, size))}")
    root = Path(out_dir)
    written: Dict[str, List[Path]] = {}
    todo = [(s, i) for s in (list(splits) if splits else default_splits(layout)) for i in range(n)]
    if progress:
        from eglp_dist.progress import progress as show_progress
        todo = show_progress(todo, total=len(todo), desc=f"synth {layout_name}", unit="img")
    for split, i in todo:
        layout.split_dir(split)  # validates the split name
        img, lab = sample(seed, split, i, tuple(size), style, shift)
        group = layout.synth_groups[i % len(layout.synth_groups)]
        img_path, label_paths = layout.write_paths(root, split, group, i)
        write_bytes_atomic(img_path, encode_image(img, img_path))
        for path, enc in label_paths:
            write_bytes_atomic(path, encode_label(lab, enc))
        written.setdefault(split, []).append(img_path)
    return written


def run_cli(args) -> int:
    """`eglp synth --dataset NAME --out DIR [--n N] [--split S ...] [--style S] [--size W H]`."""
    size = tuple(args.size) if args.size else (1024, 512)
    written = write_dataset(args.dataset, args.out, n=args.n, splits=args.split, style=args.style,
                            size=size, seed=args.seed, progress=True, shift=args.shift)
    for split, paths in written.items():
        print(f"{args.dataset} {split}: {len(paths)} images -> {args.out}")
    return 0
