"""Synthetic scenes, part 2: rendering a scene's content in a *style* (day, night, fog,
rain, game); see ``data/offline/synth.py`` for what each style is for. Night changes classes
unequally (EGLP's motivation), which ``night_change`` exposes for the DNIS tests.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image

from eglp_dist.data import labels as L
from eglp_dist.data.offline.synth_scene import IGN, ROAD, SKY, Decal, Scene
from eglp_dist.errors import DataError

STYLES = ("day", "night", "fog", "rain", "game")

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
