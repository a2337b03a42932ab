"""RCM: Rare Class Memory (EGLP), at the image level and the label level.

EGLP names the module and its two levels; the mechanics are ours:

* **Bank**: per rare class c, ``capacity`` square patches of ``patch`` pixels, each an image
  crop (normalised), its mask of class-c pixels and whether it came by day (source) or by
  night (prompt). Filled every step from the source and prompt ground truth: for each image
  and rare class with at least ``min_pixels`` pixels in it, a window centred on a random pixel
  of the class (the method's generator) replaces the oldest entry (a ring buffer, so the bank
  follows the recent crops and never exceeds its capacity). Banks are per rank (each rank
  sees its own data) and go into the per-rank checkpoint state.
* **Image level**: ``paste_per_image`` patches pasted into each mixed (student) and dark-mix
  (NFNet) image at random places, rare classes drawn uniformly among non-empty banks; day
  patches are moved towards night photometry first: in log intensity (see
  ``similarity.pixel_features``) by the class's night-minus-day mean shift that DNIS holds.
  NFNet's dark mix gets **night (prompt) patches only** by default (``night_only``): NFNet is
  "a network trained specifically on night images"; day patches there only behind
  ``method.eglp.rcm.day_patches_to_nfnet``.
* **Label level**: pasted pixels carry their class with weight 1; and rare-class *pixels*
  the UDA teacher is confident of by their class's own standard, ``max prob >= min(threshold,
  its mean confidence on pixels it labels c)``, get weight 1 (:func:`rare_pixel_weights`):
  the global 0.968 would zero the weight of classes the teacher is never that sure of. The
  per-image weight of every other pixel stays DAFormer's share at the global threshold (a
  lowered threshold feeding the image's share would lift every pixel of the image, rare or
  not). The mean confidences come from sums and counts all-reduced with DNIS's statistics
  (one collective) and are run-wide state (:class:`ClassConfidence`, saved once).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from eglp_dist.device_constants import class_mask, constant
from eglp_dist.errors import ConfigError


def label_counts(segs: Tensor) -> Tensor:
    """(B, 256) pixels per label value of (B, H, W) uint8-range labels, on their device."""
    b = segs.shape[0]
    flat = (torch.arange(b, device=segs.device)[:, None] * 256 + segs.reshape(b, -1).long()).reshape(-1)
    return torch.zeros(b * 256, dtype=torch.long, device=segs.device).index_add_(
        0, flat, torch.ones_like(flat)).view(b, 256)


class RareClassMemory:
    """The bank's images and masks live on the training device; its bookkeeping (ring
    positions, fill counts, day/night flags) on the host, so that choosing, storing and
    pasting never wait for the GPU: every index is a host integer or a device tensor.
    Per-rank state (each rank stores its own batches' patches): saved per rank."""

    run_wide = False

    def __init__(self, classes: Sequence[int], capacity: int, patch: int, min_pixels: int,
                 num_classes: int, device="cpu"):
        self.classes = [int(c) for c in classes]
        self.capacity, self.patch, self.min_pixels, self.k = capacity, patch, min_pixels, num_classes
        n = len(self.classes)
        self.images = torch.zeros(n, capacity, 3, patch, patch, device=device)
        self.masks = torch.zeros(n, capacity, patch, patch, dtype=torch.bool, device=device)
        self.night = torch.zeros(n, capacity, dtype=torch.bool)  # host
        self.filled = torch.zeros(n, dtype=torch.long)  # entries in use (host)
        self.next = torch.zeros(n, dtype=torch.long)  # ring position (host)

    # -- bank ---------------------------------------------------------------------------------
    @torch.no_grad()
    def add(self, images: Tensor, segs: Tensor, night: bool, generator: torch.Generator,
            counts: Optional[Tensor] = None) -> None:
        """Store one window per (image, rare class with >= min_pixels), centred on a random
        pixel of the class (the ``pick``-th in row-major order, ``pick`` drawn from the count).

        ``counts``: (B, 256) host pixel counts per label value (the loader's
        ``batch["label_counts"]``); without them they are counted on the device and read
        back (one host sync)."""
        p, half = self.patch, self.patch // 2
        b, _, h, w = images.shape
        if counts is None:
            counts = label_counts(segs).cpu()
        pad_img = torch.nn.functional.pad(images, (half, p - half, half, p - half))
        pad_seg = torch.nn.functional.pad(segs, (half, p - half, half, p - half), value=255)
        offsets = torch.arange(p, device=images.device)
        for i in range(b):
            for j, c in enumerate(self.classes):
                n = int(counts[i, c])
                if n < self.min_pixels:
                    continue
                pick = int(torch.randint(n, (1,), generator=generator))
                # the pick-th class-c pixel, found on the device (no nonzero: no sync)
                pos = torch.searchsorted((segs[i] == c).flatten().cumsum(0), pick + 1)
                rows, cols = (pos // w) + offsets, (pos % w) + offsets
                slot = int(self.next[j])
                self.images[j, slot] = pad_img[i][:, rows[:, None], cols[None, :]]
                self.masks[j, slot] = pad_seg[i][rows[:, None], cols[None, :]] == c
                self.night[j, slot] = night
                self.next[j] = (slot + 1) % self.capacity
                self.filled[j] = min(int(self.filled[j]) + 1, self.capacity)

    @torch.no_grad()
    def paste(self, images: Tensor, segs: Tensor, weights: Optional[Tensor], per_image: int,
              generator: torch.Generator, night_shift: Optional[Tensor] = None, mean=None, std=None,
              night_only: bool = False) -> Tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
        """Paste ``per_image`` patches into each image; returns (images, labels, weights with 1
        on pasted pixels, pasted-pixel mask). ``night_shift`` (K, 3): per class the log-intensity
        shift (night - day mean) applied to day patches (needs the normalisation mean/std).
        ``night_only``: only patches stored from night (prompt) images."""
        images, segs = images.clone(), segs.clone()
        weights = weights.clone() if weights is not None else None
        b, _, h, w = images.shape
        p = self.patch
        pasted = torch.zeros(b, h, w, dtype=torch.bool, device=images.device)
        entries = {j: [e for e in range(int(self.filled[j])) if not night_only or bool(self.night[j, e])]
                   for j in range(len(self.classes))}  # host bookkeeping: no sync
        banks = [j for j, es in entries.items() if es]
        if not banks or per_image <= 0 or p > min(h, w):
            return images, segs, weights, pasted
        for i in range(b):
            for _ in range(per_image):
                j = banks[int(torch.randint(len(banks), (1,), generator=generator))]
                e = entries[j][int(torch.randint(len(entries[j]), (1,), generator=generator))]
                y = int(torch.randint(h - p + 1, (1,), generator=generator))
                x = int(torch.randint(w - p + 1, (1,), generator=generator))
                patch, mask = self.images[j, e], self.masks[j, e]
                if night_shift is not None and not bool(self.night[j, e]):
                    patch = to_night(patch, night_shift[self.classes[j]], mean, std)
                # where(), not mask indexing: a boolean index needs its count on the host
                region = images[i, :, y:y + p, x:x + p]
                region.copy_(torch.where(mask, patch, region))
                labels = segs[i, y:y + p, x:x + p]
                labels.copy_(torch.where(mask, torch.full_like(labels, self.classes[j]), labels))
                if weights is not None:
                    wr = weights[i, y:y + p, x:x + p]
                    wr.copy_(torch.where(mask, torch.ones_like(wr), wr))
                pasted[i, y:y + p, x:x + p] |= mask
        return images, segs, weights, pasted

    # -- checkpoint (per rank) --------------------------------------------------------------------
    STATE_KEYS = ("images", "masks", "night", "filled", "next")

    def state_dict(self) -> Dict[str, Tensor]:
        return {k: getattr(self, k).clone() for k in self.STATE_KEYS}

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        """A bank saved with the same classes, capacity and patch size; a ConfigError naming
        the keys (and the saved vs configured shapes) otherwise."""
        keys = set(state)
        if keys != set(self.STATE_KEYS):
            raise ConfigError(f"rare class memory checkpoint: keys {sorted(keys)} do not match "
                              f"{sorted(self.STATE_KEYS)} (saved by another version?)")
        bad = [f"{k} saved {tuple(state[k].shape)} vs configured {tuple(getattr(self, k).shape)}"
               for k in self.STATE_KEYS if tuple(state[k].shape) != tuple(getattr(self, k).shape)]
        if bad:
            raise ConfigError("method.eglp.rcm.{classes,capacity,patch}: the checkpoint's memory bank "
                              f"has another shape ({'; '.join(bad)}); resume with the settings it was "
                              f"trained with (classes {len(self.classes)}, capacity {self.capacity}, "
                              f"patch {self.patch} now)")
        for k in self.STATE_KEYS:
            getattr(self, k).copy_(state[k])


class ClassConfidence:
    """The UDA teacher's confidence per predicted class (sum of max prob, count), an EMA of
    sums reduced across ranks every step: identical on every rank, so run-wide state (saved
    once by rank 0 and loaded by every rank, also by a rank a checkpoint did not have)."""

    run_wide = True

    def __init__(self, classes: Sequence[int], num_classes: int, momentum: float = 0.99, device="cpu"):
        self.classes = [int(c) for c in classes]
        self.k, self.momentum = num_classes, momentum
        self.conf = torch.zeros(2, num_classes, dtype=torch.float64, device=device)

    def local_sums(self, prob_max: Tensor, label: Tensor) -> Tensor:
        """(2, K) this step's [sum of max prob, count] per predicted class (to be reduced)."""
        lab = label.reshape(-1)
        out = torch.zeros(2, self.k, dtype=torch.float64, device=label.device)
        out[0].scatter_add_(0, lab, prob_max.reshape(-1).double())
        out[1].scatter_add_(0, lab, torch.ones_like(lab, dtype=torch.float64))
        return out

    def absorb(self, reduced: Tensor) -> None:
        """EMA of the sums over all ranks (``runtime.parts``)."""
        self.conf.mul_(self.momentum).add_(reduced.view_as(self.conf).to(self.conf))

    def thresholds(self, threshold: float) -> Tensor:
        """(K,) per-class thresholds: the global one, lowered for rare classes to the teacher's
        mean confidence on them (where it has labelled any)."""
        mean_conf = self.conf[0] / self.conf[1].clamp(min=1)
        out = torch.full((self.k,), float(threshold), dtype=torch.float32, device=self.conf.device)
        rare = class_mask(self.classes, self.k, self.conf.device)
        lowered = torch.minimum(out, mean_conf.float())
        return torch.where(rare & (self.conf[1] > 0), lowered, out)

    def state_dict(self) -> Dict[str, Tensor]:
        return {"conf": self.conf.clone()}

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        if tuple(state["conf"].shape) != tuple(self.conf.shape):
            raise ConfigError(f"model.num_classes: the checkpoint's rare-class confidences have shape "
                              f"{tuple(state['conf'].shape)}, this run {tuple(self.conf.shape)}")
        self.conf.copy_(state["conf"])


@torch.no_grad()
def rare_pixel_weights(weight: Tensor, label: Tensor, prob_max: Tensor, thresholds: Tensor,
                       rare: Tensor, valid: Tensor) -> Tuple[Tensor, Tensor]:
    """RCM's label level: (B, H, W) loss weights where every pixel labelled with a rare class
    (``rare`` (K,) bool) whose max probability reaches its class's threshold weighs 1, inside
    the valid area (``valid`` (H, W): 0 on the ignored margins); every other pixel keeps
    ``weight`` (the image's DAFormer share). Returns (weights, boosted-pixel mask)."""
    boosted = rare[label] & prob_max.ge(thresholds[label]) & (valid > 0)
    return torch.where(boosted, torch.ones_like(weight), weight), boosted


def to_night(patch: Tensor, shift: Tensor, mean, std) -> Tensor:
    """A normalised (3, P, P) day patch moved by ``shift`` (3,) in log intensity
    (log(1 + v) / log 256, as DNIS measures it), i.e. each channel scaled towards night."""
    m = constant(list(mean), patch.device, torch.float32, (3, 1, 1))
    s = constant(list(std), patch.device, torch.float32, (3, 1, 1))
    v = (patch * s + m).clamp(0, 255)
    logv = torch.log1p(v) / math.log(256.0) + shift.to(patch).view(3, 1, 1)
    v = torch.expm1(logv.clamp(0, 1) * math.log(256.0))
    return (v - m) / s
