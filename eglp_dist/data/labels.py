"""The one class list of the project: the 19 Cityscapes train classes and every id map to them.

Every dataset we read is mapped to these 19 trainIds (255 = ignore) once, at pack time, so
that shards, models, losses and metrics only ever see trainIds. The tables here are the
published ones (cityscapesScripts ``labels.py``, DAFormer's GTA5/Synthia converters, the
Mapillary Vistas v1.2 ``config.json`` class names), written out as data.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

NUM_CLASSES = 19
IGNORE_INDEX = 255

CLASSES: Tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
    "bus", "train", "motorcycle", "bicycle",
)
# trainId -> RGB, the Cityscapes colours (used for colourised predictions and `--format color`).
PALETTE: Tuple[Tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
CLASS_INDEX: Dict[str, int] = {name: i for i, name in enumerate(CLASSES)}

# Cityscapes labelIds (0..33; GTA5 uses the same ids) of the 19 train classes, in trainId order.
CITYSCAPES_LABEL_IDS: Tuple[int, ...] = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26,
                                         27, 28, 31, 32, 33)
CITYSCAPES_MAX_LABEL_ID = 33

# Synthia RAND_CITYSCAPES class ids (16-bit, first channel of GT/LABELS) -> trainId (DAFormer).
SYNTHIA_TO_TRAIN: Dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11,
    17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}
SYNTHIA_MAX_ID = 22  # 0 void ... 22 lanemarking
# The Synthia evaluation subsets: 16 classes (no terrain, truck, train) and 13 (also no wall,
# fence, pole), as reported by DAFormer/HRDA for SYNTHIA -> Cityscapes.
SYNTHIA_16_CLASSES: Tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
SYNTHIA_13_CLASSES: Tuple[int, ...] = (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
# The class sets an evaluation target's mIoU can average (data.val.NAME.class_sets).
CLASS_SETS: Dict[str, Tuple[int, ...]] = {"all": tuple(range(19)), "synthia16": SYNTHIA_16_CLASSES,
                                          "synthia13": SYNTHIA_13_CLASSES}

# Mapillary Vistas v1.2: the 66 class names in label-index order (config.json "labels").
MAPILLARY_CLASSES: Tuple[str, ...] = (
    "animal--bird", "animal--ground-animal", "construction--barrier--curb",
    "construction--barrier--fence", "construction--barrier--guard-rail",
    "construction--barrier--other-barrier", "construction--barrier--wall",
    "construction--flat--bike-lane", "construction--flat--crosswalk-plain",
    "construction--flat--curb-cut", "construction--flat--parking",
    "construction--flat--pedestrian-area", "construction--flat--rail-track",
    "construction--flat--road", "construction--flat--service-lane",
    "construction--flat--sidewalk", "construction--structure--bridge",
    "construction--structure--building", "construction--structure--tunnel", "human--person",
    "human--rider--bicyclist", "human--rider--motorcyclist", "human--rider--other-rider",
    "marking--crosswalk-zebra", "marking--general", "nature--mountain", "nature--sand",
    "nature--sky", "nature--snow", "nature--terrain", "nature--vegetation", "nature--water",
    "object--banner", "object--bench", "object--bike-rack", "object--billboard",
    "object--catch-basin", "object--cctv-camera", "object--fire-hydrant",
    "object--junction-box", "object--mailbox", "object--manhole", "object--phone-booth",
    "object--pothole", "object--street-light", "object--support--pole",
    "object--support--traffic-sign-frame", "object--support--utility-pole",
    "object--traffic-light", "object--traffic-sign--back", "object--traffic-sign--front",
    "object--trash-can", "object--vehicle--bicycle", "object--vehicle--boat",
    "object--vehicle--bus", "object--vehicle--car", "object--vehicle--caravan",
    "object--vehicle--motorcycle", "object--vehicle--on-rails",
    "object--vehicle--other-vehicle", "object--vehicle--trailer", "object--vehicle--truck",
    "object--vehicle--wheeled-slow", "void--car-mount", "void--ego-vehicle", "void--unlabeled",
)
# The usual Vistas -> Cityscapes grouping used by domain-generalisation papers; every class
# not listed is ignored.
MAPILLARY_TO_CITYSCAPES_NAME: Dict[str, str] = {
    "construction--barrier--curb": "sidewalk",
    "construction--barrier--fence": "fence",
    "construction--barrier--guard-rail": "fence",
    "construction--barrier--wall": "wall",
    "construction--flat--bike-lane": "road",
    "construction--flat--crosswalk-plain": "road",
    "construction--flat--curb-cut": "sidewalk",
    "construction--flat--parking": "road",
    "construction--flat--pedestrian-area": "sidewalk",
    "construction--flat--rail-track": "road",
    "construction--flat--road": "road",
    "construction--flat--service-lane": "road",
    "construction--flat--sidewalk": "sidewalk",
    "construction--structure--bridge": "building",
    "construction--structure--building": "building",
    "construction--structure--tunnel": "building",
    "human--person": "person",
    "human--rider--bicyclist": "rider",
    "human--rider--motorcyclist": "rider",
    "human--rider--other-rider": "rider",
    "marking--crosswalk-zebra": "road",
    "marking--general": "road",
    "nature--sand": "terrain",
    "nature--sky": "sky",
    "nature--snow": "terrain",
    "nature--terrain": "terrain",
    "nature--vegetation": "vegetation",
    "object--support--pole": "pole",
    "object--support--traffic-sign-frame": "traffic sign",
    "object--support--utility-pole": "pole",
    "object--traffic-light": "traffic light",
    "object--traffic-sign--front": "traffic sign",
    "object--vehicle--bicycle": "bicycle",
    "object--vehicle--bus": "bus",
    "object--vehicle--car": "car",
    "object--vehicle--motorcycle": "motorcycle",
    "object--vehicle--on-rails": "train",
    "object--vehicle--truck": "truck",
}


def _lut(pairs: Dict[int, int], size: int) -> np.ndarray:
    lut = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for src, dst in pairs.items():
        lut[src] = dst
    return lut


# Lookup tables: trainIds = LUT[ids]. Sized to cover the whole input dtype, so any id is a
# valid index (ids outside the label space are caught separately by `invalid_ids`).
CITYSCAPES_ID_TO_TRAIN = _lut({lid: t for t, lid in enumerate(CITYSCAPES_LABEL_IDS)}, 256)
GTA5_ID_TO_TRAIN = CITYSCAPES_ID_TO_TRAIN
SYNTHIA_ID_TO_TRAIN = _lut(SYNTHIA_TO_TRAIN, 65536)
MAPILLARY_ID_TO_TRAIN = _lut({i: CLASS_INDEX[MAPILLARY_TO_CITYSCAPES_NAME[n]]
                              for i, n in enumerate(MAPILLARY_CLASSES)
                              if n in MAPILLARY_TO_CITYSCAPES_NAME}, 256)
TRAIN_ID_IDENTITY = _lut({t: t for t in range(NUM_CLASSES)}, 256)
# trainId -> Cityscapes labelId, for exporting predictions to the Cityscapes/ACDC servers
# (ignore -> 0 "unlabeled").
TRAIN_TO_CITYSCAPES_ID = _lut(dict(enumerate(CITYSCAPES_LABEL_IDS)), 256)
TRAIN_TO_CITYSCAPES_ID[IGNORE_INDEX] = 0


class Encoding:
    """How a dataset stores its labels on disk: the lookup to trainIds and the legal ids."""

    def __init__(self, name: str, lut: np.ndarray, valid: np.ndarray, bits: int = 8):
        self.name, self.lut, self.valid, self.bits = name, lut, valid, bits

    def invalid_ids(self, ids: np.ndarray) -> List[int]:
        """Ids present in ``ids`` that are outside this encoding's label space (sorted)."""
        present = np.flatnonzero(np.bincount(ids.ravel(), minlength=len(self.valid)))
        return [int(v) for v in present if v >= len(self.valid) or not self.valid[v]]

    def to_train(self, ids: np.ndarray) -> np.ndarray:
        return self.lut[ids]


def _valid(ids, size: int) -> np.ndarray:
    v = np.zeros(size, dtype=bool)
    v[list(ids)] = True
    return v


ENCODINGS: Dict[str, Encoding] = {
    # 8-bit trainIds (Cityscapes *_labelTrainIds.png, ACDC/Dark Zurich gt, BDD *_train_id.png).
    "trainid": Encoding("trainid", TRAIN_ID_IDENTITY,
                        _valid(list(range(NUM_CLASSES)) + [IGNORE_INDEX], 256)),
    # 8-bit Cityscapes labelIds (gtFine *_labelIds.png, NightCity, GTA5); 255 = license plate.
    "cityscapes": Encoding("cityscapes", CITYSCAPES_ID_TO_TRAIN,
                           _valid(list(range(CITYSCAPES_MAX_LABEL_ID + 1)) + [255], 256)),
    # 16-bit Synthia class ids in the first channel of an RGB PNG.
    "synthia": Encoding("synthia", SYNTHIA_ID_TO_TRAIN, _valid(range(SYNTHIA_MAX_ID + 1), 65536),
                        bits=16),
    # 8-bit Mapillary Vistas v1.2 class indices (palette PNG).
    "mapillary": Encoding("mapillary", MAPILLARY_ID_TO_TRAIN,
                          _valid(range(len(MAPILLARY_CLASSES)), 256)),
}


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """trainIds [H, W] -> RGB uint8 [H, W, 3] in the Cityscapes palette (ignore = black)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:NUM_CLASSES] = np.asarray(PALETTE, dtype=np.uint8)
    return lut[train_ids]
