"""Synthetic scenes, part 1: the *content* (geometry and labels) of a street scene, a pure
function of its RNG: a perspective road with sidewalks, buildings, walls, fences, trees,
terrain, poles with traffic lights and signs, cars, trucks, buses, trams, persons and riders
on two-wheelers, drawn class by class into a label map plus per-object colours and decals
(windows, wheels, lamps) that the renderer (``synth_render.py``) turns into pixels.
See ``data/offline/synth.py`` for why synthetic data exists.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from eglp_dist.data import labels as L

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


@dataclass
class _Street:
    """The scene's perspective: horizon ``y0``, vanishing point ``vx``, and the road's inner and
    the sidewalks' outer edges at the bottom row, all converging at the vanishing point."""
    h: int
    w: int
    y0: int
    vx: float
    left_in: float
    right_in: float
    left_out: float
    right_out: float
    sw: float  # sidewalk width at the bottom (x / w)
    verge: float  # terrain strip (share of the sidewalk)

    @property
    def depth(self) -> float:
        return float(self.h - self.y0)

    def edge(self, x_bottom, tt):
        """x of a line through the vanishing point at relative depth ``tt`` (0 horizon, 1 bottom)."""
        return self.vx + (x_bottom - self.vx) * tt

    def ground_y(self, tt):
        return self.y0 + tt * self.depth

    def sidewalk_x(self, tt, left: bool, rng: np.random.Generator):
        lo, hi = ((self.edge(self.left_out, tt), self.edge(self.left_in, tt)) if left else
                  (self.edge(self.right_in, tt), self.edge(self.right_out, tt)))
        return rng.uniform(min(lo, hi), max(lo, hi))


def _street(h: int, w: int, rng: np.random.Generator) -> _Street:
    y0 = int(h * rng.uniform(0.36, 0.48))  # horizon
    vx = w * rng.uniform(0.42, 0.58)  # vanishing point
    a, b = rng.uniform(0.05, 0.22), rng.uniform(0.78, 0.95)  # road edges at the bottom (x / w)
    sw = rng.uniform(0.12, 0.3)
    verge = rng.uniform(0.0, 0.5) if rng.random() < 0.6 else 0.0
    return _Street(h, w, y0, vx, a * w, b * w, (a - sw) * w, (b + sw) * w, sw, verge)


def make_scene(h: int, w: int, rng: np.random.Generator) -> Scene:
    """Draw one scene's content: trainId map, object ids, per-object colours and details."""
    cv = _Canvas(h, w)
    st = _street(h, w, rng)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    # ground line under buildings = outer sidewalk edge, in perspective
    tl = (st.vx - xx) / max(st.vx - st.left_out, 1.0)
    tr = (xx - st.vx) / max(st.right_out - st.vx, 1.0)
    ground = st.y0 + np.clip(np.maximum(tl, tr), 0.0, 1.5) * st.depth  # [1, W]
    win = _buildings(cv, st, ground, rng)
    _paint_ground(cv, st, ground, yy, xx)
    win &= cv.label == BUILDING
    lamps: List[Tuple[int, int, float]] = []
    for tt, kind, left in _objects(rng):  # far to near
        _DRAW[kind](cv, st, tt, kind, left, rng, lamps)
    # ego-vehicle hood in half of the scenes: ignore, as in Cityscapes
    if rng.random() < 0.5:
        cv.ellipse(h + h * 0.02, w / 2, h * rng.uniform(0.06, 0.12), w * 0.7, IGN, 0)
    # lit windows at night: a random subset of window cells (blocky, via a coarse random grid)
    gh, gw = max(1, h // 12), max(1, w // 24)
    coarse = rng.random((gh, gw)) < rng.uniform(0.2, 0.5)
    lit = win & np.kron(coarse, np.ones((h // gh + 1, w // gw + 1), bool))[:h, :w]
    win &= cv.label == BUILDING
    lit &= win
    return Scene(cv.label, cv.inst, np.asarray(cv.colors, np.float32), st.y0, cv.decals, win, lit,
                 lamps, ground[0], st.vx, (st.left_in + st.right_in) / 2)


def _buildings(cv: _Canvas, st: _Street, ground, rng: np.random.Generator):
    """Blocks across the width, taller towards the sides, with gaps of sky; returns the mask
    of their window grid."""
    h, w, y0 = st.h, st.w, st.y0
    x = 0.0
    win = np.zeros((h, w), dtype=bool)
    while x < w:
        bw = w * rng.uniform(0.05, 0.16)
        if rng.random() > 0.12:
            side = abs((x + bw / 2) - st.vx) / (w / 2)
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
    return win


def _paint_ground(cv: _Canvas, st: _Street, ground, yy, xx) -> None:
    """Sidewalk + road trapezoid (+ terrain verge) below the ground line."""
    t = np.clip((yy - st.y0) / st.depth, 0.0, None)  # 0 at the horizon, 1 at the bottom
    below = yy > ground
    road = (xx >= st.edge(st.left_in, t)) & (xx <= st.edge(st.right_in, t)) & (yy > st.y0)
    vl = st.edge(st.left_in - st.sw * st.w * st.verge, t)
    vr = st.edge(st.right_in + st.sw * st.w * st.verge, t)
    cv.label[below] = SIDEWALK
    cv.inst[below] = 0
    verge_m = below & ~road & (xx >= vl) & (xx <= vr)
    cv.label[verge_m] = TERRAIN
    cv.label[road] = ROAD
    cv.inst[road | verge_m] = 0


def _objects(rng: np.random.Generator) -> list:
    """(relative ground depth, kind, on the left side?) of every object, far to near."""
    objects = []
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
    return objects


def _draw_barrier(cv, st: _Street, tt, kind, left, rng, lamps) -> None:
    gy, s = st.ground_y(tt), tt * st.depth  # ground row and pixel scale at this depth
    x0 = st.edge(st.left_out, tt) if left else st.edge(st.right_out, tt)
    span = st.w * rng.uniform(0.08, 0.2)
    x0, x1 = (x0 - span, x0 + span * 0.2) if left else (x0 - span * 0.2, x0 + span)
    hh = s * rng.uniform(0.12, 0.25)
    iid = cv.new_object([150, 145, 135] if kind == "wall" else [120, 95, 70])
    cv.rect(gy - hh, gy, x0, x1, WALL if kind == "wall" else FENCE, iid)
    if kind == "fence":  # see-through bars: gaps show what is behind as sky/building
        step = max(3, int(hh / 3))
        for bx in np.arange(int(x0), int(x1), step):
            cv.decal(gy - hh * 0.85, gy - hh * 0.15, bx + step * 0.4, bx + step * 0.8,
                     "dark", (70, 55, 40))


def _draw_tree(cv, st: _Street, tt, kind, left, rng, lamps) -> None:
    gy, s = st.ground_y(tt), tt * st.depth
    cx = st.edge(st.left_out, tt) + s * 0.05 if left else st.edge(st.right_out, tt) - s * 0.05
    trunk_h, r = s * rng.uniform(0.35, 0.6), s * rng.uniform(0.12, 0.25)
    iid = cv.new_object(np.array([60, 110, 40]) * rng.uniform(0.8, 1.2))
    cv.rect(gy - trunk_h, gy, cx - s * 0.015 - 1, cx + s * 0.015 + 1, VEG, iid)
    cv.ellipse(gy - trunk_h - r * 0.6, cx, r, r * rng.uniform(0.9, 1.4), VEG, iid)
    cv.decal(gy - trunk_h, gy, cx - s * 0.015 - 1, cx + s * 0.015 + 1, "dark", (80, 55, 35))


def _draw_pole(cv, st: _Street, tt, kind, left, rng, lamps) -> None:
    """A pole carrying a traffic light (45 %), a sign (40 %) or a street lamp (lit at night)."""
    gy, s = st.ground_y(tt), tt * st.depth
    cx = st.sidewalk_x(tt, left, rng)
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


def _draw_person(cv, st: _Street, tt, kind, left, rng, lamps) -> None:
    gy, s = st.ground_y(tt), tt * st.depth
    cx = st.sidewalk_x(tt, left, rng)
    ph = s * rng.uniform(0.28, 0.38)
    pw = ph * 0.18
    iid = cv.new_object(_CLOTHES[rng.integers(len(_CLOTHES))])
    cv.rect(gy - ph * 0.85, gy - ph * 0.45, cx - pw, cx + pw, PERSON, iid)  # torso
    cv.rect(gy - ph * 0.45, gy, cx - pw * 0.8, cx + pw * 0.8, PERSON, iid)  # legs
    cv.ellipse(gy - ph * 0.92, cx, ph * 0.08, ph * 0.07, PERSON, iid)  # head
    cv.decal(gy - ph * 0.45, gy, cx - pw * 0.8, cx + pw * 0.8, "dark", (35, 35, 45))
    cv.decal(gy - ph, gy - ph * 0.84, cx - ph * 0.07, cx + ph * 0.07, "dark",
             (200, 160, 130), round=True)


_VEHICLE = {  # kind: (class, width / depth scale, height / width)
    "car": (CAR, 0.55, 0.45), "truck": (TRUCK, 0.7, 0.85), "bus": (BUS, 0.8, 0.85),
    "train": (TRAIN, 0.9, 0.75)}


def _draw_vehicle(cv, st: _Street, tt, kind, left, rng, lamps) -> None:
    """A car, truck, bus or train on the road: body, windows, wheels, lamps."""
    gy, s = st.ground_y(tt), tt * st.depth
    lo, hi = st.edge(st.left_in, tt), st.edge(st.right_in, tt)
    cls, width, aspect = _VEHICLE[kind]
    vw = s * width
    vh = vw * aspect
    cx = rng.uniform(lo + vw * 0.3, max(hi - vw * 0.3, lo + vw * 0.3 + 1))
    car_color = _CAR_COLORS[rng.integers(len(_CAR_COLORS))]  # drawn for every kind: later draws depend on it
    col = {"car": car_color, "truck": np.array([215, 215, 210]), "bus": np.array([230, 140, 30]),
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


def _draw_two_wheeler(cv, st: _Street, tt, kind, left, rng, lamps) -> None:
    """A motorcycle or bicycle on the road with its rider."""
    gy, s = st.ground_y(tt), tt * st.depth
    lo, hi = st.edge(st.left_in, tt), st.edge(st.right_in, tt)
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


_DRAW = {"wall": _draw_barrier, "fence": _draw_barrier, "tree": _draw_tree, "pole": _draw_pole,
         "person": _draw_person, "car": _draw_vehicle, "truck": _draw_vehicle, "bus": _draw_vehicle,
         "train": _draw_vehicle, "moto": _draw_two_wheeler, "bike": _draw_two_wheeler}
