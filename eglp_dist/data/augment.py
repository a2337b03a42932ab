"""The geometric augmentation, decided once per sample and applied the same way by both backends.

MMSeg/DAFormer's training pipeline is Resize(img_scale, ratio_range, keep_ratio) ->
RandomCrop(crop_size, cat_max_ratio) -> RandomFlip(prob) -> Normalize -> Pad(crop_size,
0 / 255). All of its randomness depends on the *label* only (cat_max_ratio, and rare-class
crop retries), never on the image. So we decide the geometry here, on the label (decoded
losslessly on the CPU, cheap: one channel), and express it as one resampling of an image
*box* to the crop's size: "resize the whole image, then crop" equals "resample the crop's
source box to the crop size" (same pixel centres, same filter), and a horizontal flip is
the same box with its x ends swapped. Both backends then do only that (``resize_crop``: cv2's
resize of the part of the image the crop reaches, or PIL ``Image.resize(box=...)``; DALI
``fn.resize(roi_start, roi_end)``). That makes their semantics identical by construction, the
label tensors bit-identical, and it is cheap: the image is decoded once and only the crop
region is resampled.

Which resampling (``data.resample``):

* ``mmcv`` (default, the reference): what mmcv's ``imrescale`` does for DAFormer/HRDA/PIG's
  ``Resize``: images with cv2 ``INTER_LINEAR`` (the pil back-end calls cv2 itself) -- bilinear
  on half-pixel centres, coordinates clamped at the border, **no antialiasing** when
  shrinking -- and labels with cv2
  ``INTER_NEAREST``, which takes source pixel ``floor(dst * src / dst_size)`` (not the centre);
* ``antialias``: bilinear with antialiasing when shrinking (PIL ``BILINEAR``, DALI
  ``antialias=True``) and pixel-centre nearest labels: smoother downscales, not the papers'.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from eglp_dist.data.labels import IGNORE_INDEX
from eglp_dist.data.sampling import Pick

CAT_MAX_TRIES = 10  # MMSeg RandomCrop
RCS_TRIES = 11  # DAFormer get_rare_class_sample: the first crop and up to 10 re-crops


@dataclass
class Geometry:
    """Where the output comes from: resample ``box`` (x0, y0, x1, y1 in source pixels) to
    ``out_hw``, mirror horizontally if ``flip``, then pad bottom/right to ``pad_hw``."""

    box: Tuple[float, float, float, float]
    out_hw: Tuple[int, int]
    pad_hw: Tuple[int, int]
    scaled_hw: Tuple[int, int]  # size of the image after Resize (before crop)
    crop_yx: Tuple[int, int]  # crop offset in the resized image
    flip: bool

    def to_meta(self) -> dict:
        return {"img_shape": list(self.scaled_hw), "crop": [self.crop_yx[0], self.crop_yx[1],
                                                          self.out_hw[0], self.out_hw[1]],
                "flip": self.flip}


def rescale_hw(hw: Tuple[int, int], img_scale: Optional[Sequence[int]], ratio: float = 1.0
               ) -> Tuple[int, int]:
    """MMSeg ``Resize(keep_ratio=True)``: scale by min(long/long_edge, short/short_edge) of
    ``img_scale * ratio``; sizes rounded with int(x + 0.5). ``img_scale=None``: no resize."""
    h, w = hw
    if img_scale is None:
        return h, w
    long_, short = max(img_scale) * ratio, min(img_scale) * ratio
    sf = min(long_ / max(h, w), short / min(h, w))
    return max(1, int(h * sf + 0.5)), max(1, int(w * sf + 0.5))


def _nearest_index(offset: int, length: int, scale: float, src_len: int, centre: bool) -> np.ndarray:
    """Source index of each output pixel: cv2 INTER_NEAREST ``floor(dst * (1 / scale))`` (the
    reciprocal first, as cv2 computes it: dividing instead rounds the other way at some exact
    integers) or, with ``centre``, the pixel whose area holds the output pixel's centre."""
    pos = (offset + np.arange(length) + (0.5 if centre else 0.0)) * (1.0 / scale)
    return np.minimum(pos.astype(np.int64), src_len - 1)


def crop_label(label: np.ndarray, scaled_hw, top: int, left: int, out_hw, resample: str = "mmcv") -> np.ndarray:
    """The label under a crop of the resized image (nearest neighbour), without resizing all."""
    h, w = label.shape
    centre = resample == "antialias"
    rows = _nearest_index(top, out_hw[0], scaled_hw[0] / h, h, centre)
    cols = _nearest_index(left, out_hw[1], scaled_hw[1] / w, w, centre)
    return label[rows][:, cols]


def resize_crop(image: np.ndarray, geom: Geometry) -> np.ndarray:
    """mmcv's ``Resize`` then ``RandomCrop`` of a uint8 [H, W, C] image, literally: cv2.resize
    with INTER_LINEAR to ``geom.scaled_hw``, then the crop -- the same pixels as DAFormer/HRDA's
    pipeline, bit for bit (not flipped; the caller mirrors).

    Only the top-left part of the image that the crop reaches, plus a 2-pixel margin, is
    resized: cv2 gives an output pixel taps and weights that depend on its index and the scale
    alone (``fx`` is the full resize's, ``scaled / size``), so that part's resize is the full
    one's top-left corner as long as no tap the crop uses is clamped at the part's own edge,
    which the margin rules out (``tests/test_data_loaders.py`` checks it against the full resize).
    """
    import cv2

    height, width = image.shape[:2]
    (sh, sw), (top, left), (h, w) = geom.scaled_hw, geom.crop_yx, geom.out_hw
    fy, fx = sh / height, sw / width
    ye = min(height, math.ceil((top + h) / fy) + 2)
    xe = min(width, math.ceil((left + w) / fx) + 2)
    if (ye, xe) == (height, width) or (round(ye * fy), round(xe * fx)) == (ye, xe):
        # the whole image, also where the part would keep its size: cv2 copies an image whose
        # output size equals its own, whatever the scale
        scaled = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_LINEAR)
    else:
        scaled = cv2.resize(image[:ye, :xe], None, fx=fx, fy=fy, interpolation=cv2.INTER_LINEAR)
    return scaled[top:top + h, left:left + w]


class Augmenter:
    """Draws a sample's geometry from its RNG (and label) for one stream's config."""

    def __init__(self, stream_cfg, min_class_pixels: Optional[float] = None, resample: str = "mmcv"):
        self.img_scale = list(stream_cfg.img_scale) if stream_cfg.img_scale is not None else None
        self.ratio_range = list(stream_cfg.ratio_range) if stream_cfg.ratio_range is not None else None
        self.crop = tuple(stream_cfg.crop_size) if stream_cfg.crop_size is not None else None
        self.cat_max_ratio = float(stream_cfg.cat_max_ratio)
        self.flip_prob = float(stream_cfg.flip_prob)
        self.min_class_pixels = min_class_pixels
        self.resample = resample

    def _offset(self, rng, scaled_hw, out_hw, label, pick: Pick) -> Tuple[int, int]:
        mh, mw = scaled_hw[0] - out_hw[0], scaled_hw[1] - out_hw[1]
        if pick.centre and label is not None and pick.cls >= 0:
            ys, xs = np.nonzero(label == pick.cls)
            if len(ys):
                j = int(rng.integers(len(ys)))
                cy = (ys[j] + 0.5) * scaled_hw[0] / label.shape[0]
                cx = (xs[j] + 0.5) * scaled_hw[1] / label.shape[1]
                return (int(np.clip(cy - out_hw[0] / 2, 0, mh)), int(np.clip(cx - out_hw[1] / 2, 0, mw)))
        return int(rng.integers(0, mh + 1)), int(rng.integers(0, mw + 1))

    def _crop(self, rng, scaled_hw, out_hw, label, pick):
        """MMSeg RandomCrop: up to 10 crops until the largest class (ignore excluded) covers
        < cat_max_ratio of the crop and there are >= 2 classes; the 11th draw is kept."""
        top, left = self._offset(rng, scaled_hw, out_hw, label, pick)
        if label is None or self.cat_max_ratio >= 1.0 or pick.centre:
            return top, left, (crop_label(label, scaled_hw, top, left, out_hw, self.resample)
                               if label is not None else None)
        for _ in range(CAT_MAX_TRIES):
            seg = crop_label(label, scaled_hw, top, left, out_hw, self.resample)
            cnt = np.bincount(seg.ravel(), minlength=256)
            cnt[IGNORE_INDEX] = 0
            cnt = cnt[cnt > 0]
            if len(cnt) > 1 and cnt.max() / cnt.sum() < self.cat_max_ratio:
                return top, left, seg
            top, left = self._offset(rng, scaled_hw, out_hw, label, pick)
        return top, left, crop_label(label, scaled_hw, top, left, out_hw, self.resample)

    def draw(self, rng: np.random.Generator, hw: Tuple[int, int], label: Optional[np.ndarray],
             pick: Pick = Pick(-1)) -> Tuple[Geometry, Optional[np.ndarray]]:
        """(geometry, label crop uint8 [pad_hw] with 255 padding, already flipped) of a sample
        of size ``hw``. With RCS, the whole draw is retried (the first crop and up to 10 more)
        until the crop holds more than ``min_class_pixels`` of the picked class, as in
        DAFormer's ``uda_dataset.py`` (``for j in range(10)`` after the first sample)."""
        tries = RCS_TRIES if (self.min_class_pixels is not None and pick.cls >= 0
                              and label is not None) else 1
        for _ in range(tries):
            ratio = float(rng.uniform(*self.ratio_range)) if self.ratio_range else 1.0
            scaled = rescale_hw(hw, self.img_scale, ratio)
            out_hw = (min(self.crop[0], scaled[0]), min(self.crop[1], scaled[1])) if self.crop else scaled
            top, left, seg = self._crop(rng, scaled, out_hw, label, pick)
            if tries == 1 or int((seg == pick.cls).sum()) > self.min_class_pixels:
                break
        flip = bool(rng.random() < self.flip_prob)
        sy, sx = scaled[0] / hw[0], scaled[1] / hw[1]
        box = (left / sx, top / sy, (left + out_hw[1]) / sx, (top + out_hw[0]) / sy)
        pad_hw = tuple(self.crop) if self.crop else out_hw
        geom = Geometry(box, out_hw, pad_hw, scaled, (top, left), flip)
        if seg is not None:
            seg = pad_label(seg[:, ::-1] if flip else seg, pad_hw)
        return geom, seg

    def label_under(self, geom: Geometry, label: np.ndarray) -> np.ndarray:
        """The label under a geometry drawn without it (crop, flip, pad as ``draw`` does)."""
        seg = crop_label(label, geom.scaled_hw, geom.crop_yx[0], geom.crop_yx[1], geom.out_hw, self.resample)
        return pad_label(seg[:, ::-1] if geom.flip else seg, geom.pad_hw)


def pad_label(seg: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    """Pad bottom/right with ignore (MMSeg Pad seg_pad_val=255)."""
    if seg.shape == tuple(hw):
        return np.ascontiguousarray(seg)
    out = np.full(hw, IGNORE_INDEX, np.uint8)
    out[: seg.shape[0], : seg.shape[1]] = seg
    return out


def eval_geometry(hw: Tuple[int, int], img_scale) -> Geometry:
    """Evaluation: the whole image resized to img_scale (keep ratio), no crop, no flip."""
    scaled = rescale_hw(hw, img_scale)
    return Geometry((0.0, 0.0, float(hw[1]), float(hw[0])), scaled, scaled, scaled, (0, 0), False)
