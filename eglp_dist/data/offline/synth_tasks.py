"""The synthetic tasks the demo, the studies and the tests train on: which splits of which
layout in which style, synthesised and packed into shards once (``prepare_data``).

* day -> night (``night_datasets``): a Cityscapes-layout day source, an ACDC-layout night
  target (train and val) and a few labelled night prompt images;
* domain generalisation (``DG_DATASETS``): a "game"-style GTA5 source and the same validation
  streets in four unseen styles.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

IMAGE_SIZE = (256, 128)  # W, H of the synthetic images
NIGHT_SHIFT = 0.5  # half-strength night: a real gap that self-training can close
N_TRAIN, N_VAL, N_PROMPT = 96, 24, 6


def night_datasets(night_shift: float = NIGHT_SHIFT, prompts: int = N_PROMPT) -> list:
    """The day -> night task's splits: (layout, split, style, shift, images (None:
    n_train/n_val; "val": n_val), shard folder)."""
    return [
        ("cityscapes", "train", "day", 1.0, None, "cityscapes_train"),
        ("acdc", "train", "night", night_shift, None, "acdc_night_train"),
        ("acdc", "val", "night", night_shift, None, "acdc_night_val"),
        ("prompt", "train", "night", night_shift, prompts, "prompt_night"),  # PIG/EGLP's few labelled nights
    ]


DATASETS = night_datasets()


# The synthetic domain-generalisation task (tools/ablate.py spn): a "game"-style source and
# the same validation streets in four unseen styles, at full strength (and a Synthia split
# for the class-subset tests). Validation content is shared across the styles, so the
# targets differ in style only.
DG_DATASETS = [
    ("gta5", "train", "game", 1.0, None, "gta5_train"),
    ("cityscapes", "val", "day", 1.0, None, "cityscapes_val"),
    ("acdc", "val", "night", 1.0, None, "acdc_night_val"),
    ("foggy_cityscapes", "val", "fog", 1.0, None, "foggy_cityscapes_val"),
    ("rain_cityscapes", "val", "rain", 1.0, None, "rain_cityscapes_val"),
    ("synthia", "train", "game", 1.0, "val", "synthia_val"),  # as many as a val split
]


def prepare_data(out: Path, seed: int = 0, n_train: int = N_TRAIN, n_val: int = N_VAL,
                 size=IMAGE_SIZE, datasets=DATASETS, content_seeds=None) -> Dict[str, Path]:
    """Synthesise and pack the demo's splits (skipped where shards already exist). The
    tests use it too, with fewer and smaller images. ``content_seeds``: layout -> offset of
    its scene seed (default 1; the demo's source 0 and prompts 2 show other streets)."""
    content_seeds = {"cityscapes": 0, "prompt": 2} if content_seeds is None else content_seeds
    from eglp_dist.data.offline.pack import pack
    from eglp_dist.data.offline.synth import write_dataset

    shards = {}
    for layout, split, style, shift, count, name in datasets:
        n = n_val if "val" in (split, count) else count or n_train
        target = out / "shards" / name
        shards[name] = target
        if (target / "manifest.json").is_file():
            continue
        raw = out / "raw" / f"{layout}_{style}"
        write_dataset(layout, raw, n=n, splits=[split], style=style, size=size,
                      seed=seed + content_seeds.get(layout, 1), shift=shift)
        pack(layout, raw, split, target, shard_size=32, progress=False)
    return shards


def prepare_dg_data(out: Path, seed: int = 0, n_train: int = N_TRAIN, n_val: int = N_VAL,
                    size=IMAGE_SIZE) -> Dict[str, Path]:
    """The synthetic DG task's shards (:data:`DG_DATASETS`): every target shows the same
    validation streets (one content seed), the source other ones."""
    return prepare_data(out, seed, n_train, n_val, size, DG_DATASETS, content_seeds={"gta5": 0})


