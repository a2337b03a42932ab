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
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from eglp_dist.data import labels as L
from eglp_dist.data.layouts import Layout, default_splits, get_layout
from eglp_dist.atomic import write_bytes_atomic
from eglp_dist.errors import DataError

STYLES = ("day", "night", "fog", "rain", "game")
MIN_SIZE = 32  # pixels per side: the scene geometry (horizon, lanes, objects) needs room
C = L.CLASS_INDEX
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE = (C["road"], C["sidewalk"], C["building"], C["wall"],
                                              C["fence"], C["pole"])
TLIGHT, TSIGN, VEG, TERRAIN, SKY = (C["traffic light"], C["traffic sign"], C["vegetation"],
                                    C["terrain"], C["sky"])
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTO, BIKE = (C["person"], C["rider"], C["car"], C["truck"],
                                                    C["bus"], C["train"], C["motorcycle"],
                                                    C["bicycle"])
IGN = L.IGNORE_INDEX


# --------------------------------------------------------------------------- scene content
@dataclass
class Decal:
    """A coloured detail inside an object (window, wheel, lamp); lamps glow at night."""

    y0: int
    y1: int
    x0: int
    x1: int
    kind: str  # dark | glass | lamp | light | marking
    color: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    round: bool = False


@dataclass
class Scene:
    label: np.ndarray  # uint8 [H, W] trainIds (255 ignore)
    inst: np.ndarray  # int32 [H, W] object id (0 = stuff)
    colors: np.ndarray  # float32 [n_obj + 1, 3] day colour per object id
    horizon: int
    decals: List[Decal] = field(default_factory=list)
    windows: Optional[np.ndarray] = None  # bool [H, W]: building windows
    lit: Optional[np.ndarray] = None  # bool [H, W]: windows lit at night
    lamps: List[Tuple[int, int, float]] = field(default_factory=list)  # street lamps (y, x, r)
    ground: Optional[np.ndarray] = None  # float [W]: y of the ground line under buildings
    vx: float = 0.0  # vanishing point x
    road_mid: float = 0.0  # x of the road centre at the bottom row


class _Canvas:
    """Paints class/instance masks in bounding boxes (far to near, later wins)."""

    def __init__(self, h: int, w: int):
        self.h, self.w = h, w
        self.label = np.full((h, w), SKY, dtype=np.uint8)
        self.inst = np.zeros((h, w), dtype=np.int32)
        self.colors: List[Tuple[float, float, float]] = [(0.0, 0.0, 0.0)]
        self.decals: List[Decal] = []

    def new_object(self, color) -> int:
        self.colors.append(tuple(float(c) for c in color))
        return len(self.colors) - 1

    def _box(self, y0, y1, x0, x1):
        y0, y1 = max(int(y0), 0), min(int(np.ceil(y1)), self.h)
        x0, x1 = max(int(x0), 0), min(int(np.ceil(x1)), self.w)
        return y0, y1, x0, x1

    def rect(self, y0, y1, x0, x1, cls, iid=0):
        y0, y1, x0, x1 = self._box(y0, y1, x0, x1)
        if y1 > y0 and x1 > x0:
            self.label[y0:y1, x0:x1] = cls
            self.inst[y0:y1, x0:x1] = iid

    def ellipse(self, cy, cx, ry, rx, cls, iid=0):
        y0, y1, x0, x1 = self._box(cy - ry, cy + ry + 1, cx - rx, cx + rx + 1)
        if y1 <= y0 or x1 <= x0:
            return
        yy, xx = np.ogrid[y0:y1, x0:x1]
        m = ((yy - cy) / max(ry, 0.5)) ** 2 + ((xx - cx) / max(rx, 0.5)) ** 2 <= 1.0
        self.label[y0:y1, x0:x1][m] = cls
        self.inst[y0:y1, x0:x1][m] = iid

    def decal(self, y0, y1, x0, x1, kind, color=(0, 0, 0), round=False):
        y0, y1, x0, x1 = self._box(y0, y1, x0, x1)
        if y1 > y0 and x1 > x0:
            self.decals.append(Decal(y0, y1, x0, x1, kind, tuple(color), round))


_CAR_COLORS = np.array([[200, 30, 30], [30, 60, 160], [230, 230, 230], [40, 40, 40],
                        [150, 150, 160], [20, 110, 60], [220, 180, 40], [110, 60, 30]], np.float32)
_CLOTHES = np.array([[40, 40, 120], [150, 30, 40], [30, 30, 30], [200, 200, 190], [60, 120, 60],
                     [210, 120, 30], [120, 60, 140]], np.float32)


def make_scene(h: int, w: int, rng: np.random.Generator) -> Scene:
    """Draw one scene's content: trainId map, object ids, per-object colours and details."""
    cv = _Canvas(h, w)
    y0 = int(h * rng.uniform(0.36, 0.48))  # horizon
    vx = w * rng.uniform(0.42, 0.58)  # vanishing point
    a, b = rng.uniform(0.05, 0.22), rng.uniform(0.78, 0.95)  # road edges at the bottom (x / w)
    sw = rng.uniform(0.12, 0.3)  # sidewalk width at the bottom (x / w)
    verge = rng.uniform(0.0, 0.5) if rng.random() < 0.6 else 0.0  # terrain strip (of sidewalk)
    left_in, right_in = a * w, b * w
    left_out, right_out = (a - sw) * w, (b + sw) * w
    depth = float(h - y0)

    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    t = np.clip((yy - y0) / depth, 0.0, None)  # 0 at the horizon, 1 at the bottom

    def edge(x_bottom, tt):
        return vx + (x_bottom - vx) * tt

    # ground line under buildings = outer sidewalk edge, in perspective
    tl = (vx - xx) / max(vx - left_out, 1.0)
    tr = (xx - vx) / max(right_out - vx, 1.0)
    ground = y0 + np.clip(np.maximum(tl, tr), 0.0, 1.5) * depth  # [1, W]

    # buildings: blocks across the width, taller towards the sides, with gaps of sky
    x = 0.0
    win = np.zeros((h, w), dtype=bool)
    while x < w:
        bw = w * rng.uniform(0.05, 0.16)
        if rng.random() > 0.12:
            side = abs((x + bw / 2) - vx) / (w / 2)
            top = y0 - (y0 * rng.uniform(0.25, 0.95)) * (0.25 + side)
            color = rng.choice([[175, 160, 140], [140, 135, 130], [160, 90, 70], [200, 195, 180],
                                [110, 110, 120]]) * rng.uniform(0.85, 1.15)
            iid = cv.new_object(color)
            x0i, x1i = int(x), int(min(x + bw, w))
            gl = ground[0, x0i:x1i].max() if x1i > x0i else y0
            cv.rect(top, gl, x0i, x1i, BUILDING, iid)
            # windows: a grid inside the facade
            py, px = max(4, int(h * rng.uniform(0.03, 0.06))), max(4, int(bw / rng.integers(2, 6)))
            ys = np.arange(max(int(top), 0), min(int(y0), h))
            if len(ys) and x1i > x0i:
                wy = ((ys - int(top)) % py) < py * 0.55
                wx = ((np.arange(x0i, x1i) - x0i) % px) < px * 0.5
                win[np.ix_(ys, np.arange(x0i, x1i))] |= wy[:, None] & wx[None, :]
        x += bw

    # ground: sidewalk + road trapezoid (+ terrain verge) below the ground line
    below = yy > ground
    road = (xx >= edge(left_in, t)) & (xx <= edge(right_in, t)) & (yy > y0)
    vl = edge(left_in - sw * w * verge, t)
    vr = edge(right_in + sw * w * verge, t)
    cv.label[below] = SIDEWALK
    cv.inst[below] = 0
    verge_m = below & ~road & (xx >= vl) & (xx <= vr)
    cv.label[verge_m] = TERRAIN
    cv.label[road] = ROAD
    cv.inst[road | verge_m] = 0
    win &= cv.label == BUILDING

    def ground_y(tt):
        return y0 + tt * depth

    def sidewalk_x(tt, left: bool):
        lo, hi = (edge(left_out, tt), edge(left_in, tt)) if left else (edge(right_in, tt),
                                                                         edge(right_out, tt))
        return rng.uniform(min(lo, hi), max(lo, hi))

    objects = []  # (ground y, kind, params) drawn far to near
    for _ in range(rng.integers(1, 4) if rng.random() < 0.5 else 0):
        objects.append((rng.uniform(0.15, 0.7), "wall", rng.random() < 0.5))
    for _ in range(rng.integers(1, 3) if rng.random() < 0.5 else 0):
        objects.append((rng.uniform(0.15, 0.7), "fence", rng.random() < 0.5))
    for _ in range(rng.integers(1, 6)):
        objects.append((rng.uniform(0.1, 0.9), "tree", rng.random() < 0.5))
    for _ in range(rng.integers(2, 7)):
        objects.append((rng.uniform(0.1, 0.9), "pole", rng.random() < 0.5))
    for _ in range(rng.integers(1, 7)):
        objects.append((rng.uniform(0.1, 1.0), "person", rng.random() < 0.5))
    for _ in range(rng.integers(2, 7)):
        objects.append((rng.uniform(0.08, 1.0), "car", None))
    for kind, p in (("truck", 0.3), ("bus", 0.2), ("train", 0.06), ("moto", 0.25), ("bike", 0.35)):
        if rng.random() < p:
            objects.append((rng.uniform(0.15, 0.9), kind, None))
    objects.sort(key=lambda o: o[0])
    lamps: List[Tuple[int, int, float]] = []

    for tt, kind, left in objects:
        gy = ground_y(tt)
        s = tt * depth  # pixel scale at this depth
        if kind in ("wall", "fence"):
            x0 = edge(left_out, tt) if left else edge(right_out, tt)
            span = w * rng.uniform(0.08, 0.2)
            x0, x1 = (x0 - span, x0 + span * 0.2) if left else (x0 - span * 0.2, x0 + span)
            hh = s * rng.uniform(0.12, 0.25)
            iid = cv.new_object([150, 145, 135] if kind == "wall" else [120, 95, 70])
            cv.rect(gy - hh, gy, x0, x1, WALL if kind == "wall" else FENCE, iid)
            if kind == "fence":  # see-through bars: gaps show what is behind as sky/building
                step = max(3, int(hh / 3))
                for bx in np.arange(int(x0), int(x1), step):
                    cv.decal(gy - hh * 0.85, gy - hh * 0.15, bx + step * 0.4, bx + step * 0.8,
                             "dark", (70, 55, 40))
        elif kind == "tree":
            cx = edge(left_out, tt) + s * 0.05 if left else edge(right_out, tt) - s * 0.05
            trunk_h, r = s * rng.uniform(0.35, 0.6), s * rng.uniform(0.12, 0.25)
            iid = cv.new_object(np.array([60, 110, 40]) * rng.uniform(0.8, 1.2))
            cv.rect(gy - trunk_h, gy, cx - s * 0.015 - 1, cx + s * 0.015 + 1, VEG, iid)
            cv.ellipse(gy - trunk_h - r * 0.6, cx, r, r * rng.uniform(0.9, 1.4), VEG, iid)
            cv.decal(gy - trunk_h, gy, cx - s * 0.015 - 1, cx + s * 0.015 + 1, "dark", (80, 55, 35))
        elif kind == "pole":
            cx = sidewalk_x(tt, left)
            ph, pw = s * rng.uniform(0.7, 1.1), max(1.0, s * 0.012)
            iid = cv.new_object([130, 130, 135])
            cv.rect(gy - ph, gy, cx - pw, cx + pw, POLE, iid)
            r = rng.random()
            if r < 0.45:  # traffic light: housing with three lamps, one lit
                bw_, bh = pw * 3.5, pw * 9
                lid = cv.new_object([35, 35, 30])
                cv.rect(gy - ph, gy - ph + bh, cx - bw_, cx + bw_, TLIGHT, lid)
                on = rng.integers(0, 3)
                for k, col in enumerate([(255, 40, 30), (255, 190, 40), (40, 255, 120)]):
                    cy = gy - ph + bh * (k + 0.5) / 3
                    cv.decal(cy - bw_ * 0.6, cy + bw_ * 0.6, cx - bw_ * 0.6, cx + bw_ * 0.6,
                             "lamp" if k == on else "dark", col if k == on else (20, 20, 20),
                             round=True)
            elif r < 0.85:  # traffic sign
                sr = pw * rng.uniform(3, 5)
                sid = cv.new_object(rng.choice([[220, 200, 30], [230, 230, 230], [40, 80, 190]]))
                cy = gy - ph * rng.uniform(0.65, 0.9)
                if rng.random() < 0.5:
                    cv.ellipse(cy, cx, sr, sr, TSIGN, sid)
                else:
                    cv.rect(cy - sr, cy + sr, cx - sr, cx + sr, TSIGN, sid)
                cv.decal(cy - sr * 0.4, cy + sr * 0.4, cx - sr * 0.4, cx + sr * 0.4, "dark",
                         (30, 30, 30), round=True)
            else:  # street lamp (lit at night)
                lamps.append((int(gy - ph), int(cx), float(s * 0.25)))
                cv.decal(gy - ph, gy - ph + pw * 3, cx - pw * 3, cx + pw * 3, "light",
                         (255, 220, 160), round=True)
        elif kind == "person":
            cx = sidewalk_x(tt, left)
            ph = s * rng.uniform(0.28, 0.38)
            pw = ph * 0.18
            iid = cv.new_object(_CLOTHES[rng.integers(len(_CLOTHES))])
            cv.rect(gy - ph * 0.85, gy - ph * 0.45, cx - pw, cx + pw, PERSON, iid)  # torso
            cv.rect(gy - ph * 0.45, gy, cx - pw * 0.8, cx + pw * 0.8, PERSON, iid)  # legs
            cv.ellipse(gy - ph * 0.92, cx, ph * 0.08, ph * 0.07, PERSON, iid)  # head
            cv.decal(gy - ph * 0.45, gy, cx - pw * 0.8, cx + pw * 0.8, "dark", (35, 35, 45))
            cv.decal(gy - ph, gy - ph * 0.84, cx - ph * 0.07, cx + ph * 0.07, "dark",
                     (200, 160, 130), round=True)
        else:  # vehicles on the road
            lo, hi = edge(left_in, tt), edge(right_in, tt)
            if kind in ("car", "truck", "bus", "train"):
                vw = s * {"car": 0.55, "truck": 0.7, "bus": 0.8, "train": 0.9}[kind]
                vh = vw * {"car": 0.45, "truck": 0.85, "bus": 0.85, "train": 0.75}[kind]
                cx = rng.uniform(lo + vw * 0.3, max(hi - vw * 0.3, lo + vw * 0.3 + 1))
                cls = {"car": CAR, "truck": TRUCK, "bus": BUS, "train": TRAIN}[kind]
                col = {"car": _CAR_COLORS[rng.integers(len(_CAR_COLORS))],
                       "truck": np.array([215, 215, 210]), "bus": np.array([230, 140, 30]),
                       "train": np.array([200, 40, 40])}[kind] * rng.uniform(0.85, 1.1)
                iid = cv.new_object(col)
                x0, x1 = cx - vw / 2, cx + vw / 2
                if kind == "car":
                    cv.rect(gy - vh * 0.55, gy - vh * 0.1, x0, x1, cls, iid)
                    cv.rect(gy - vh, gy - vh * 0.5, x0 + vw * 0.15, x1 - vw * 0.15, cls, iid)
                    cv.decal(gy - vh * 0.92, gy - vh * 0.58, x0 + vw * 0.2, x1 - vw * 0.2,
                             "glass", (60, 80, 100))
                else:
                    cv.rect(gy - vh, gy - vh * 0.1, x0, x1, cls, iid)
                    band = (0.2, 0.5) if kind != "truck" else (0.1, 0.35)
                    cv.decal(gy - vh * (1 - band[0]), gy - vh * (1 - band[1]), x0 + vw * 0.05,
                             x1 - vw * 0.05, "light" if kind in ("bus", "train") else "glass",
                             (60, 80, 100))
                for wx in (x0 + vw * 0.18, x1 - vw * 0.18):  # wheels (part of the vehicle)
                    cv.ellipse(gy - vh * 0.1, wx, vh * 0.1, vw * 0.08, cls, iid)
                    cv.decal(gy - vh * 0.2, gy, wx - vw * 0.08, wx + vw * 0.08, "dark",
                             (20, 20, 20), round=True)
                for lx in (x0 + vw * 0.08, x1 - vw * 0.08):  # head/tail lamps
                    lamp_col = (255, 240, 200) if rng.random() < 0.5 else (255, 30, 20)
                    cv.decal(gy - vh * 0.42, gy - vh * 0.3, lx - vw * 0.05, lx + vw * 0.05,
                             "lamp", lamp_col, round=True)
            else:  # two-wheeler + rider
                vw = s * 0.22
                cx = rng.uniform(lo, hi)
                cls = MOTO if kind == "moto" else BIKE
                iid = cv.new_object([30, 30, 35] if kind == "moto" else [90, 20, 30])
                cv.ellipse(gy - vw * 0.2, cx - vw * 0.35, vw * 0.2, vw * 0.2, cls, iid)
                cv.ellipse(gy - vw * 0.2, cx + vw * 0.35, vw * 0.2, vw * 0.2, cls, iid)
                cv.rect(gy - vw * 0.45, gy - vw * 0.2, cx - vw * 0.35, cx + vw * 0.35, cls, iid)
                rid = cv.new_object(_CLOTHES[rng.integers(len(_CLOTHES))])
                rh = s * 0.25
                cv.rect(gy - vw * 0.45 - rh * 0.7, gy - vw * 0.4, cx - rh * 0.12, cx + rh * 0.12,
                        RIDER, rid)
                cv.ellipse(gy - vw * 0.45 - rh * 0.8, cx, rh * 0.1, rh * 0.09, RIDER, rid)
                if kind == "moto":
                    cv.decal(gy - vw * 0.45, gy - vw * 0.3, cx + vw * 0.3, cx + vw * 0.45,
                             "lamp", (255, 240, 200), round=True)

    # ego-vehicle hood in half of the scenes: ignore, as in Cityscapes
    if rng.random() < 0.5:
        cv.ellipse(h + h * 0.02, w / 2, h * rng.uniform(0.06, 0.12), w * 0.7, IGN, 0)
    # lit windows at night: a random subset of window cells (blocky, via a coarse random grid)
    gh, gw = max(1, h // 12), max(1, w // 24)
    coarse = rng.random((gh, gw)) < rng.uniform(0.2, 0.5)
    lit = win & np.kron(coarse, np.ones((h // gh + 1, w // gw + 1), bool))[:h, :w]
    win &= cv.label == BUILDING
    lit &= win
    return Scene(cv.label, cv.inst, np.asarray(cv.colors, np.float32), y0, cv.decals, win, lit,
                 lamps, ground[0], vx, (left_in + right_in) / 2)


# --------------------------------------------------------------------------- rendering
_DAY = np.zeros((256, 3), np.float32)
_DAY[:L.NUM_CLASSES] = [
    (95, 92, 98), (165, 160, 152), (170, 160, 145), (150, 145, 135), (120, 95, 70),
    (130, 130, 135), (35, 35, 30), (220, 200, 30), (60, 110, 40), (140, 150, 80),
    (140, 185, 235), (60, 60, 120), (60, 60, 120), (120, 120, 130), (215, 215, 210),
    (230, 140, 30), (200, 40, 40), (30, 30, 35), (90, 20, 30)]
_DAY[IGN] = (40, 40, 45)
# texture strength (high-frequency noise amplitude) per class
_TEX = np.zeros(256, np.float32)
_TEX[:L.NUM_CLASSES] = [0.06, 0.05, 0.05, 0.08, 0.1, 0.03, 0.02, 0.02, 0.22, 0.15, 0.01, 0.05,
                        0.05, 0.03, 0.03, 0.03, 0.03, 0.05, 0.05]
# night: multiplicative brightness per class (road changes least, sky/buildings most)
_NIGHT_GAIN = np.ones(256, np.float32)
_NIGHT_GAIN[:L.NUM_CLASSES] = [0.9, 0.8, 0.3, 0.65, 0.65, 0.65, 0.7, 0.75, 0.6, 0.65, 0.0,
                               0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]
_NIGHT_GAIN[IGN] = 0.3
_NIGHT_TINT = np.array([1.05, 0.95, 0.85], np.float32)  # sodium street lights


def night_change() -> np.ndarray:
    """(19,) the designed night change of each class: 1 - its brightness factor (sky 1.0,
    building 0.7, road 0.1). What DNIS must recover (tests/test_eglp.py)."""
    return 1.0 - _NIGHT_GAIN[:L.NUM_CLASSES].copy()


def _lowfreq(rng, h, w, cells=(6, 12), amp=1.0) -> np.ndarray:
    small = rng.standard_normal(cells).astype(np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((w, h), Image.BILINEAR)) * amp


def _blur(img: np.ndarray, radius: float) -> np.ndarray:
    """Cheap wide blur of a float [H, W, 3] image: antialiased downscale, bilinear upscale."""
    h, w = img.shape[:2]
    f = max(2, int(radius))
    out = np.empty_like(img)
    for c in range(3):
        ch = Image.fromarray(np.ascontiguousarray(img[..., c]), mode="F")
        ch = ch.resize((max(1, w // f), max(1, h // f)), Image.BILINEAR)
        out[..., c] = np.asarray(ch.resize((w, h), Image.BILINEAR))
    return out


def _decal_mask(d: Decal) -> np.ndarray:
    hh, ww = d.y1 - d.y0, d.x1 - d.x0
    if not d.round:
        return np.ones((hh, ww), bool)
    yy, xx = np.ogrid[0:hh, 0:ww]
    return ((yy + 0.5 - hh / 2) / (hh / 2)) ** 2 + ((xx + 0.5 - ww / 2) / (ww / 2)) ** 2 <= 1.0


def _render_day(scene: Scene, rng: np.random.Generator, game: bool) -> np.ndarray:
    lab, h, w = scene.label, scene.label.shape[0], scene.label.shape[1]
    base = _DAY[lab].copy()
    obj = scene.inst > 0
    base[obj] = scene.colors[scene.inst[obj]]
    sky = lab == SKY
    rows = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    sky_top, sky_bot = (np.array([70, 170, 255], np.float32), np.array([190, 240, 255], np.float32)) \
        if game else (np.array([95, 140, 215], np.float32), np.array([195, 210, 230], np.float32))
    grad = sky_top + (sky_bot - sky_top) * np.clip(rows / max(scene.horizon / h, 1e-3), 0, 1)[..., None]
    clouds = np.clip(_lowfreq(rng, h, w, (4, 10)), 0, None)[..., None] * 25.0
    base[sky] = (np.broadcast_to(grad, (h, w, 3)) + clouds)[sky]
    hf = rng.standard_normal((h, w)).astype(np.float32)
    lf = _lowfreq(rng, h, w, (8, 16))
    tex = 1.0 + _TEX[lab] * (hf * (2.0 if game else 1.0)) + 0.04 * lf
    img = base * tex[..., None]
    if scene.windows is not None:
        img[scene.windows] = img[scene.windows] * 0.45 + np.array([20, 30, 45], np.float32)
    # road markings: dashed centre line
    cols = np.arange(w)[None, :]
    rws = np.arange(h)[:, None]
    for d in scene.decals:
        m = _decal_mask(d)
        region = img[d.y0:d.y1, d.x0:d.x1]
        col = np.asarray(d.color, np.float32)
        if d.kind == "glass":
            region[m] = region[m] * 0.3 + col * 0.5
        elif d.kind == "light":
            region[m] = col * 0.8
        else:
            region[m] = col * (0.85 if d.kind == "lamp" else 1.0)
    road = lab == ROAD
    tt = np.clip((rws - scene.horizon) / max(h - scene.horizon, 1), 0, 1)
    centre = np.abs(cols - (scene.vx + (scene.road_mid - scene.vx) * tt)) < (1 + 4 * tt)
    dashes = ((rws * (1.0 / (0.2 + tt))).astype(np.int64) // 6) % 2 == 0
    img[road & centre & dashes] = (225, 225, 215)
    if game:  # GTA-like: stronger contrast and saturation, warm grading
        grey = img.mean(axis=2, keepdims=True)
        img = (grey + (img - grey) * 1.5 - 128.0) * 1.2 + 128.0
        img *= np.array([1.08, 1.0, 0.9], np.float32)
    return img


def _render_night(scene: Scene, day: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    lab, h, w = scene.label, day.shape[0], day.shape[1]
    img = day * _NIGHT_GAIN[lab][..., None] * _NIGHT_TINT
    sky = lab == SKY
    rows = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    img[sky] = np.broadcast_to(np.array([6, 8, 22], np.float32) + rows * 30.0, (h, w, 3))[sky]
    if scene.lit is not None:
        img[scene.lit] = np.array([255, 205, 120], np.float32) * rng.uniform(0.7, 1.0)
    glow = np.zeros_like(img)
    for d in scene.decals:
        if d.kind in ("lamp", "light"):
            m = _decal_mask(d)
            col = np.asarray(d.color, np.float32)
            img[d.y0:d.y1, d.x0:d.x1][m] = np.maximum(col, 200.0 * col / col.max())
            glow[d.y0:d.y1, d.x0:d.x1][m] = col
    # street lamps light a warm pool around them
    if scene.lamps:
        yy = np.arange(h, dtype=np.float32)[:, None]
        xx = np.arange(w, dtype=np.float32)[None, :]
        for ly, lx, r in scene.lamps:
            r = max(r, 4.0)
            img += (np.exp(-(((yy - ly) ** 2 + (xx - lx) ** 2) / (2 * (3 * r) ** 2)))[..., None]
                    * np.array([60, 45, 25], np.float32))
    img += _blur(glow, radius=max(h, w) / 150) * 3.0  # bloom around lit objects
    noise = rng.standard_normal((h, w, 1)).astype(np.float32) * 3.0 \
        + rng.standard_normal((h, w, 3)).astype(np.float32) * 2.0
    return img + noise * (1.0 + np.sqrt(np.clip(img, 0, None)) / 8.0)


def _render_fog(scene: Scene, day: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h = day.shape[0]
    rows = np.arange(h, dtype=np.float32)[:, None]
    # distance ~ 1 / (height below the horizon) of the point where a pixel meets the ground:
    # its own row on the ground, the ground line for what stands on it, far for the sky
    contact = np.maximum(rows, np.minimum(scene.ground[None, :], h))
    dist = np.clip((h - scene.horizon) / np.maximum(contact - scene.horizon, 1.0), 1.0, 40.0)
    dist = np.where(scene.label == SKY, 40.0, dist)
    a = (1.0 - np.exp(-rng.uniform(0.08, 0.15) * dist))[..., None]
    return day * (1 - a) + np.array([200, 202, 205], np.float32) * a


def _render_rain(scene: Scene, day: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = day.shape[:2]
    img = day * 0.7 + day.mean(axis=2, keepdims=True) * 0.15
    drops = (rng.random((h, w)) < 0.004).astype(np.float32)
    streak = np.zeros_like(drops)
    length = max(4, h // 40)
    for k in range(length):  # slanted streaks by shifting the drop map
        streak += np.roll(np.roll(drops, k, axis=0), k // 3, axis=1)
    return img + np.clip(streak, 0, 1)[..., None] * 60.0


def render(scene: Scene, style: str, rng: np.random.Generator, shift: float = 1.0,
           day_rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Render a scene in a style -> uint8 RGB [H, W, 3]. The day image underneath is drawn
    with ``day_rng`` (default ``rng``), the style's own randomness with ``rng``.

    ``shift`` in [0, 1] scales the domain shift of night/fog/rain: the result is
    ``day + shift * (styled - day)`` (1 = full style, 0 = the day image), a knob for making a
    demo's adaptation problem harder or easier without changing what is drawn.
    """
    if style not in STYLES:
        raise DataError(f"unknown synthetic style {style!r} (known: {', '.join(STYLES)})")
    if not 0.0 <= shift <= 1.0:
        raise DataError(f"shift must be in [0, 1], got {shift}")
    day = _render_day(scene, day_rng or rng, game=style == "game")
    styler = {"night": _render_night, "fog": _render_fog, "rain": _render_rain}.get(style)
    img = day if styler is None else styler(scene, day, rng)
    if styler is not None and shift < 1.0:
        img = day + shift * (img - day)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


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


# --------------------------------------------------------------------------- writing
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


def png16_rgb(arr: np.ndarray) -> bytes:
    """Encode uint16 [H, W, 3] as a 16-bit RGB PNG (Synthia's label format; PIL cannot)."""
    h, w, _ = arr.shape
    raw = np.zeros((h, 1 + w * 6), np.uint8)  # filter byte 0 per row
    raw[:, 1:] = arr.astype(">u2").view(np.uint8).reshape(h, w * 6)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(
            ">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 1)) + chunk(b"IEND", b""))


def encode_label(train_ids: np.ndarray, encoding: str) -> bytes:
    """trainIds -> PNG bytes in a dataset's label encoding (as the real dataset stores it)."""
    lut, _ = _ENCODE[encoding]
    ids = lut[train_ids]
    if encoding == "synthia":
        rgb = np.zeros(ids.shape + (3,), np.uint16)
        rgb[..., 0] = ids
        return png16_rgb(rgb)
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
