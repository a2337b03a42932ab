"""Where each dataset keeps its images and labels, and how their names pair up.

A dataset is described once, here, as data (MMSegmentation's ``img_dir``/``img_suffix``/
``ann_dir``/``seg_map_suffix`` idea, extended with fallbacks): ``eglp pack`` reads with it and
``eglp synth`` writes with it, so synthetic data is found by exactly the code that finds the
real datasets. The label of an image sits at the same relative sub-path under the label folder
with the image suffix replaced by a label suffix; the first label suffix that exists wins
(e.g. Cityscapes ``*_gtFine_labelTrainIds.png``, else ``*_gtFine_labelIds.png`` mapped on the
fly), and the suffix also says how the label is encoded (see ``labels.ENCODINGS``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from eglp_dist.errors import DataError


@dataclass(frozen=True)
class Pair:
    """One sample found on disk: the image, its label (None if unlabelled) and its encoding."""

    image: Path
    label: Optional[Path]
    encoding: Optional[str]
    rel: str  # image path relative to the dataset root (used in keys, meta and predictions)
    missing_label: Optional[str] = None  # expected label path(s) when a labelled split has none


@dataclass(frozen=True)
class Layout:
    """One dataset's folder layout.

    ``image_dirs``/``label_dirs`` are templates relative to the root with ``{split}`` (the
    split's folder name) and ``{condition}``; the first one that exists is used.
    ``label_suffixes`` are ``(suffix, encoding)`` in order of preference.
    ``labelled_splits`` lists splits that must have labels (a missing label is an error);
    other splits are packed as unlabelled images (e.g. test splits, for ``eglp predict``).
    """

    name: str
    image_dirs: Tuple[str, ...]
    image_suffixes: Tuple[str, ...]
    label_dirs: Tuple[str, ...]
    label_suffixes: Tuple[Tuple[str, str], ...]
    splits: Dict[str, str]  # split name -> folder name used in the templates
    labelled_splits: Tuple[str, ...]
    condition: str = ""
    recursive: bool = True
    # What `eglp synth` writes: style and size of the published data, and how files are named.
    synth_style: str = "day"
    synth_name: str = "{group}_{seq:06d}_{frame:06d}"  # file stem before the suffix
    synth_groups: Tuple[str, ...] = ("aachen", "bochum", "zurich")  # sub-folders (cities, ...)
    synth_label_suffixes: Tuple[str, ...] = ()  # which label files synth writes (default: first)
    synth_image_suffix: str = ""  # image suffix synth writes (default: the first image suffix)

    def split_dir(self, split: str) -> str:
        if split not in self.splits:
            raise DataError(f"dataset {self.name!r} has no split {split!r} "
                            f"(known: {', '.join(self.splits)})")
        return self.splits[split]

    def _fill(self, template: str, split: str) -> str:
        return template.format(split=self.split_dir(split), condition=self.condition)

    def image_dir(self, root: Path, split: str) -> Path:
        """The first existing image folder (or the first template, for writing)."""
        candidates = [root / self._fill(t, split) for t in self.image_dirs]
        return next((c for c in candidates if c.is_dir()), candidates[0])

    def label_dir(self, root: Path, split: str) -> Path:
        candidates = [root / self._fill(t, split) for t in self.label_dirs]
        return next((c for c in candidates if c.is_dir()), candidates[0])

    def find(self, root: os.PathLike, split: str) -> List[Pair]:
        """All (image, label) pairs of a split, sorted by relative image path.

        Raises DataError naming the folder when the root or the image folder is missing or
        holds no images. Missing labels are reported per sample (``Pair.missing_label``) so
        that ``--skip-bad`` can skip them.
        """
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: dataset root does not exist")
        img_dir = self.image_dir(root, split)
        if not img_dir.is_dir():
            tried = ", ".join(str(root / self._fill(t, split)) for t in self.image_dirs)
            raise DataError(f"{img_dir}: image folder of {self.name} split {split!r} not found "
                            f"(tried {tried})")
        labelled = split in self.labelled_splits
        lbl_dir = self.label_dir(root, split)
        pairs = []
        walker = img_dir.rglob("*") if self.recursive else img_dir.iterdir()
        for path in sorted(p for p in walker if p.is_file()):
            suffix = next((s for s in self.image_suffixes if path.name.endswith(s)), None)
            if suffix is None:
                continue
            sub = path.relative_to(img_dir).as_posix()
            stem = sub[: len(sub) - len(suffix)]
            rel = path.relative_to(root).as_posix()
            if not labelled:
                pairs.append(Pair(path, None, None, rel))
                continue
            found = next(((lbl_dir / (stem + s), enc) for s, enc in self.label_suffixes
                          if (lbl_dir / (stem + s)).is_file()), None)
            if found is None:
                expected = " or ".join(str(lbl_dir / (stem + s)) for s, _ in self.label_suffixes)
                pairs.append(Pair(path, None, None, rel, missing_label=expected))
            else:
                pairs.append(Pair(path, found[0], found[1], rel))
        if not pairs:
            raise DataError(f"{img_dir}: no images ending in {' or '.join(self.image_suffixes)}")
        return pairs

    def write_paths(self, root: Path, split: str, group: str, index: int
                    ) -> Tuple[Path, List[Tuple[Path, str]]]:
        """Where `eglp synth` writes sample ``index`` of ``split``: image path and label paths."""
        stem = self.synth_name.format(group=group, seq=index // 10, frame=19 + index % 10,
                                      index=index)
        sub = f"{group}/{stem}" if self.recursive and group else stem
        image = (root / self._fill(self.image_dirs[0], split)
                 / (sub + (self.synth_image_suffix or self.image_suffixes[0])))
        labels: List[Tuple[Path, str]] = []
        if split in self.labelled_splits:
            wanted = self.synth_label_suffixes or (self.label_suffixes[0][0],)
            enc = dict(self.label_suffixes)
            labels = [(root / self._fill(self.label_dirs[0], split) / (sub + s), enc[s])
                      for s in wanted]
        return image, labels


_CITY_SPLITS = {"train": "train", "val": "val", "test": "test"}
_CS_LABELS = (("_gtFine_labelTrainIds.png", "trainid"), ("_gtFine_labelIds.png", "cityscapes"))
# SPN's README keeps the zip folder names (leftImg8bit_trainvaltest/leftImg8bit/...).
_CS_LABEL_DIRS = ("gtFine/{split}", "gtFine_trainvaltest/gtFine/{split}")


def _cityscapes_like(name: str, img_dir: str, img_suffix: str, style: str) -> Layout:
    return Layout(
        name=name,
        image_dirs=(img_dir, "leftImg8bit_trainvaltest/leftImg8bit/{split}", "leftImg8bit/{split}"),
        image_suffixes=(img_suffix, "_leftImg8bit.png"),
        label_dirs=_CS_LABEL_DIRS, label_suffixes=_CS_LABELS, splits=_CITY_SPLITS,
        labelled_splits=("train", "val"), synth_style=style,
        synth_label_suffixes=("_gtFine_labelTrainIds.png", "_gtFine_labelIds.png"))


def _acdc(condition: str) -> Layout:
    # Official layout rgb_anon/<condition>/<split>/<sequence>/; HRDA's README flattens it to
    # rgb_anon/<split>/ (all conditions), accepted as a fallback.
    return Layout(
        name="acdc" if condition == "night" else f"acdc_{condition}",
        image_dirs=("rgb_anon/{condition}/{split}", "rgb_anon/{split}"),
        image_suffixes=("_rgb_anon.png",),
        label_dirs=("gt/{condition}/{split}", "gt/{split}"),
        label_suffixes=(("_gt_labelTrainIds.png", "trainid"), ("_gt_labelIds.png", "cityscapes")),
        splits={"train": "train", "val": "val", "test": "test"},
        labelled_splits=("train", "val"), condition=condition,
        synth_style=condition if condition in ("night", "fog", "rain") else "day",
        synth_name="{group}_frame_{index:06d}",
        synth_groups=("GOPR0351", "GOPR0356"))


LAYOUTS: Dict[str, Layout] = {
    "cityscapes": _cityscapes_like("cityscapes", "leftImg8bit/{split}", "_leftImg8bit.png", "day"),
    "foggy_cityscapes": _cityscapes_like("foggy_cityscapes", "leftImg8bit_foggy/{split}",
                                         "_leftImg8bit_foggy_beta_0.02.png", "fog"),
    "rain_cityscapes": _cityscapes_like(
        "rain_cityscapes", "leftImg8bit_rain/{split}",
        "_leftImg8bit_rain_alpha_0.01_beta_0.005_dropsize_0.01_pattern_1.png", "rain"),
    "acdc": _acdc("night"),
    "acdc_fog": _acdc("fog"),
    "acdc_rain": _acdc("rain"),
    "acdc_snow": _acdc("snow"),
    "dark_zurich": Layout(
        name="dark_zurich",
        image_dirs=("rgb_anon/{split}/night",),
        image_suffixes=("_rgb_anon.png",),
        label_dirs=("gt/{split}/night",),
        label_suffixes=(("_gt_labelTrainIds.png", "trainid"), ("_gt_labelIds.png", "cityscapes")),
        splits={"train": "train", "val": "val", "test": "test"},
        labelled_splits=("val",), synth_style="night",
        synth_name="{group}_frame_{index:06d}", synth_groups=("GOPR0356",)),
    # NightCity / NightCity+ (FDLNet's release): images/<split>/X.png + label/<split>/X_labelIds.png;
    # the EGLP README's img/<split> + gt/<split> layout is the fallback.
    **{name: Layout(
        name=name,
        image_dirs=("images/{split}", "img/{split}"),
        image_suffixes=(".png", ".jpg"),
        label_dirs=("label/{split}", "gt/{split}"),
        label_suffixes=(("_labelIds.png", "cityscapes"), ("_labelTrainIds.png", "trainid"),
                        (".png", "cityscapes")),
        splits={"train": "train", "val": "val"}, labelled_splits=("train", "val"),
        recursive=False, synth_style="night",
        synth_name="{group}_{index:04d}", synth_groups=("Chicago",))
        for name in ("nightcity", "nightcity_plus")},
    # GTA5 has no split folders: every split name reads all of images/ (DAFormer trains on all).
    "gta5": Layout(
        name="gta5", image_dirs=("images",), image_suffixes=(".png",), label_dirs=("labels",),
        label_suffixes=((".png", "cityscapes"),), splits={"train": "", "all": ""},
        labelled_splits=("train", "all"), recursive=False,
        synth_style="game", synth_name="{index:05d}", synth_groups=("",)),
    "synthia": Layout(
        name="synthia", image_dirs=("RGB",), image_suffixes=(".png",), label_dirs=("GT/LABELS",),
        label_suffixes=((".png", "synthia"),), splits={"train": "", "all": ""},
        labelled_splits=("train", "all"), recursive=False,
        synth_style="game", synth_name="{index:07d}", synth_groups=("",)),
    "bdd100k": Layout(
        name="bdd100k", image_dirs=("images/{split}", "seg/images/{split}"),
        image_suffixes=(".jpg", ".png"), label_dirs=("labels/{split}", "seg/labels/{split}"),
        label_suffixes=(("_train_id.png", "trainid"), (".png", "trainid")),
        splits={"train": "train", "val": "val", "test": "test"},
        labelled_splits=("train", "val"), recursive=False,
        synth_style="day", synth_name="{index:04d}bdd-{group}", synth_groups=("a",)),
    "mapillary": Layout(
        name="mapillary", image_dirs=("{split}/images",), image_suffixes=(".jpg",),
        label_dirs=("{split}/labels",), label_suffixes=((".png", "mapillary"),),
        splits={"train": "training", "val": "validation", "test": "testing"},
        labelled_splits=("train", "val"), recursive=False,
        synth_style="day", synth_name="m{group}{index:06d}", synth_groups=("x",)),
    # The few labelled night prompt images of EGLP: <root>/img/X.png + <root>/gt/X.png (trainIds;
    # ACDC-named files X_rgb_anon.png + X_gt_labelTrainIds.png pair too). Root is data/prompt.
    "prompt": Layout(
        name="prompt", image_dirs=("img",), image_suffixes=("_rgb_anon.png", ".png", ".jpg"),
        label_dirs=("gt",),
        label_suffixes=(("_gt_labelTrainIds.png", "trainid"), ("_labelTrainIds.png", "trainid"),
                        ("_labelIds.png", "cityscapes"), (".png", "trainid")),
        splits={"train": "", "all": ""}, labelled_splits=("train", "all"), recursive=False,
        synth_style="night", synth_name="prompt_{index:03d}", synth_groups=("",),
        synth_image_suffix=".png", synth_label_suffixes=(".png",)),
}


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r} (known: {', '.join(sorted(LAYOUTS))})") from None


def default_splits(layout: Layout) -> List[str]:
    """The splits `eglp synth` writes when none is given: train and val where they exist."""
    out: List[str] = []
    for s in ("train", "val"):
        if s in layout.splits and layout.splits[s] not in [layout.splits[x] for x in out]:
            out.append(s)
    return out or [next(iter(layout.splits))]
