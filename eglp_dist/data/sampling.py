"""Which sample (and which class) each batch slot gets: uniform, rare class (DAFormer) or
class-uniform (RobustNet/SPN), all from the manifest's class statistics.

Why here and not in a torch Sampler: each pick is a pure function of (seed, rank, step, slot)
and its RNG, so training can resume exactly at any step, every rank draws the same number of
samples whatever the shard sizes (no DDP hang), and no image is read to decide.
"""
from __future__ import annotations

import threading
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from eglp_dist.errors import DataError


class Pick(NamedTuple):
    index: int  # global sample index in the manifest
    cls: int = -1  # the class this pick is for (RCS / class-uniform), -1 = none
    centre: bool = False  # class-uniform: centre the crop on a pixel of ``cls``


def rcs_class_probs(class_pixels, temperature: float) -> Tuple[np.ndarray, np.ndarray]:
    """DAFormer's rare-class distribution: over classes present in the data,
    f_c = n_c / sum(n), P(c) = softmax((1 - f_c) / T). Returns (classes, probs)."""
    counts = np.asarray(class_pixels, dtype=np.float64)
    classes = np.flatnonzero(counts > 0)
    if len(classes) == 0:
        raise DataError("rare class sampling needs labelled pixels, the manifest has none")
    freq = counts[classes] / counts[classes].sum()
    logits = (1.0 - freq) / temperature
    p = np.exp(logits - logits.max())
    return classes, p / p.sum()


class UniformSampler:
    """Every sample once per epoch, epochs in a seeded permutation shared by all ranks; rank r
    takes global positions ((step * world + r) * batch + slot), so ranks never overlap within
    an epoch and a batch depends only on (seed, rank, step)."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int,
                 salt: int = 0):
        if num_samples < 1:
            raise DataError("cannot sample from an empty manifest")
        self.n, self.b, self.rank, self.world = num_samples, batch_size, rank, world_size
        self.seed, self.salt = seed, salt
        self._perms: Dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # picks run in the prefetch threads

    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                if len(self._perms) > 4:
                    self._perms.pop(min(self._perms))
                perm = np.random.default_rng([self.seed, self.salt, epoch]).permutation(self.n)
                self._perms[epoch] = perm
            return perm

    def position(self, step: int, slot: int) -> int:
        return (step * self.world + self.rank) * self.b + slot

    def pick(self, step: int, slot: int, rng: np.random.Generator) -> Pick:
        epoch, pos = divmod(self.position(step, slot), self.n)
        return Pick(int(self._perm(epoch)[pos]))


class RandomSampler:
    """Uniformly at random with replacement, each pick from its own (seed, rank, step, slot)
    RNG: PIG's draw of one prompt image per batch slot from a handful of them (an epoch
    permutation over 6 images would make ranks and steps repeat in lock-step)."""

    def __init__(self, num_samples: int):
        if num_samples < 1:
            raise DataError("cannot sample from an empty manifest")
        self.n = num_samples

    def pick(self, step: int, slot: int, rng: np.random.Generator) -> Pick:
        return Pick(int(rng.integers(self.n)))


class RareClassSampler:
    """DAFormer RCS: draw c ~ P(c), then an image with > min_pixels of c (the crop is then
    retried by the augmenter until it holds enough of c). Classes with no such image are
    dropped from P(c) and the rest renormalised (DAFormer asserts instead)."""

    def __init__(self, sample_class_pixels, class_pixels, temperature: float, min_pixels: int):
        per = np.asarray(sample_class_pixels, dtype=np.int64)
        classes, probs = rcs_class_probs(class_pixels, temperature)
        self.candidates: Dict[int, np.ndarray] = {}
        keep = []
        for c, p in zip(classes, probs):
            idx = np.flatnonzero(per[:, c] > min_pixels)
            if len(idx):
                self.candidates[int(c)] = idx
                keep.append((int(c), p))
        if not keep:
            raise DataError(f"rare class sampling: no image has > {min_pixels} pixels of any class")
        self.classes = np.array([c for c, _ in keep])
        self.probs = np.array([p for _, p in keep])
        self.probs /= self.probs.sum()

    def pick(self, step: int, slot: int, rng: np.random.Generator) -> Pick:
        c = int(rng.choice(self.classes, p=self.probs))
        return Pick(int(rng.choice(self.candidates[c])), c)


class ClassUniformSampler:
    """RobustNet-style: with probability ``pct`` draw a class uniformly among present classes,
    an image containing it uniformly, and centre the crop on one of its pixels; otherwise fall
    back to the uniform (epoch) sampler."""

    def __init__(self, sample_class_pixels, pct: float, uniform: UniformSampler):
        per = np.asarray(sample_class_pixels, dtype=np.int64)
        self.candidates = {int(c): np.flatnonzero(per[:, c] > 0) for c in range(per.shape[1])
                           if (per[:, c] > 0).any()}
        if not self.candidates:
            raise DataError("class-uniform sampling needs labelled pixels, the manifest has none")
        self.classes = np.array(sorted(self.candidates))
        self.pct, self.uniform = pct, uniform

    def pick(self, step: int, slot: int, rng: np.random.Generator) -> Pick:
        if rng.random() < self.pct:
            c = int(rng.choice(self.classes))
            return Pick(int(rng.choice(self.candidates[c])), c, centre=True)
        return self.uniform.pick(step, slot, rng)


def build_sampler(sampling_cfg, manifest_data: dict, batch_size: int, rank: int,
                  world_size: int, seed: int, salt: int = 0):
    """The sampler a stream's ``sampling`` block asks for."""
    mode = sampling_cfg.mode
    n = manifest_data["num_samples"]
    uniform = UniformSampler(n, batch_size, rank, world_size, seed, salt)
    if mode == "uniform":
        return uniform
    if mode == "random":
        return RandomSampler(n)
    if not manifest_data["labelled"]:
        raise DataError(f"{mode} sampling needs labels; {manifest_data['dataset']}/"
                        f"{manifest_data['split']} was packed without them")
    per: List[List[int]] = manifest_data["sample_class_pixels"]
    if mode == "rcs":
        return RareClassSampler(per, manifest_data["class_pixels"], sampling_cfg.rcs_temperature,
                                sampling_cfg.rcs_min_pixels)
    if mode == "class_uniform":
        return ClassUniformSampler(per, sampling_cfg.class_uniform_pct, uniform)
    raise DataError(f"unknown sampling mode {mode!r}")


def min_class_pixels(sampling_cfg) -> Optional[float]:
    """A crop must hold more than this many pixels of the RCS class (None: no crop retries)."""
    if sampling_cfg.mode != "rcs" or sampling_cfg.rcs_min_crop_ratio <= 0:
        return None
    return float(sampling_cfg.rcs_min_pixels * sampling_cfg.rcs_min_crop_ratio)
