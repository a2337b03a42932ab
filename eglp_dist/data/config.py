"""Config of the data engine: backend, one block per stream, sampling, threads, seed.

Names follow MMSegmentation/HRDA so their users read them at a glance: ``img_scale`` is
(long, short) edge as in ``Resize(img_scale=(2048, 1024))`` (W x H for landscape images),
``ratio_range`` as in ``Resize(ratio_range=(0.5, 2.0))``, ``crop_size`` is (H, W) as in
``RandomCrop(crop_size=(512, 512), cat_max_ratio=0.75)``, ``flip_prob`` as in
``RandomFlip(prob=0.5)``, ``mean``/``std`` as in ``img_norm_cfg`` (RGB, 0..255), and the
rare-class-sampling keys as in DAFormer's ``rare_class_sampling`` dict. Only OmegaConf
structured-config types are used (str/int/float/bool/Optional/List/nested dataclasses); choices
and bounds use ``config_fields`` so ``load_config`` rejects bad values naming the key, and
``check_data_config`` checks what relates several keys when a loader is built.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from eglp_dist.config_fields import check_fields, choice, in_range, non_negative, positive, probability
from eglp_dist.data.labels import CLASS_SETS as LABEL_CLASS_SETS
from eglp_dist.errors import ConfigError


# dali: DALI decodes/resizes/normalises (nvJPEG on a GPU) | pil: PIL decode threads on the CPU
# (webdataset reads evaluation shards). "wds" is pil's old name, accepted with a warning.
BACKENDS = ("dali", "pil", "wds")
SAMPLING = ("uniform", "random", "rcs", "class_uniform")
DECODE_DEVICES = ("auto", "cpu", "mixed")  # auto: 'mixed' (nvJPEG) when CUDA is in use, else cpu
RESAMPLE = ("mmcv", "antialias")  # see data/augment.py


@dataclass
class SamplingConfig:
    # uniform: every sample once per epoch (a global permutation), disjoint across ranks;
    # random: uniformly with replacement (PIG's prompt images);
    # rcs: DAFormer rare class sampling; class_uniform: RobustNet/SPN class-uniform crops
    mode: str = choice("uniform", SAMPLING)
    rcs_temperature: float = positive(0.01)  # DAFormer: P(c) = softmax((1 - f_c) / T)
    rcs_min_pixels: int = non_negative(3000)  # images with > this many pixels of c qualify
    rcs_min_crop_ratio: float = non_negative(0.5)  # re-crop (<= 10x) until > ratio * min_pixels
    class_uniform_pct: float = probability(0.5)  # share of class-uniform crops (RobustNet)


@dataclass
class StreamConfig:
    """One training stream (source, target, prompt): where its shards are and its pipeline."""

    # an `eglp pack --out` folder (holds manifest.json), or a list of them read as one
    # dataset in the order given (e.g. ACDC's four conditions); "" = stream unused
    shards: Any = ""
    batch_size: int = positive(2)
    img_scale: Optional[List[int]] = field(default_factory=lambda: [2048, 1024])  # (long, short)
    ratio_range: Optional[List[float]] = None  # e.g. [0.5, 2.0]; None = resize to img_scale
    crop_size: Optional[List[int]] = field(default_factory=lambda: [512, 512])  # (H, W); None = no crop
    cat_max_ratio: float = in_range(0.75, 0, 1, lo_open=True)  # 1.0 disables; a crop's largest class stays below
    flip_prob: float = probability(0.5)
    with_labels: bool = True  # False for the unlabelled target (labels are never read)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


# Which classes a target's mIoU averages: Cityscapes' 19, or the subsets the DG and UDA
# papers report for Synthia (labels.CLASS_SETS).
CLASS_SETS = tuple(LABEL_CLASS_SETS)


@dataclass
class EvalStreamConfig:
    """One evaluation target (``data.val.NAME``) or the prediction split (``data.test``): whole
    images, one per batch, resized to ``img_scale`` (keep ratio), never cropped or flipped."""

    shards: Any = ""  # a shard folder or a list of them (one target); "" = not evaluated
    img_scale: Optional[List[int]] = field(default_factory=lambda: [2048, 1024])  # (long, short)
    with_labels: bool = True
    # the mIoU of each set is reported; the first is the target's headline (averaged across
    # targets). Synthia: [synthia16, synthia13], as the DG papers and DAFormer report it.
    class_sets: List[str] = field(default_factory=lambda: ["all"])


@dataclass
class DataConfig:
    backend: str = choice("pil", BACKENDS)
    source: StreamConfig = field(default_factory=StreamConfig)
    target: StreamConfig = field(default_factory=lambda: StreamConfig(with_labels=False))
    prompt: StreamConfig = field(default_factory=StreamConfig)
    # evaluation targets, name -> stream: each is evaluated at every eval interval and by
    # `eglp eval`, and their headline mIoUs are averaged (DG reports several unseen targets)
    val: Dict[str, EvalStreamConfig] = field(default_factory=dict)
    test: EvalStreamConfig = field(default_factory=lambda: EvalStreamConfig(with_labels=False))
    num_threads: int = positive(4)  # decode/augment threads per rank (DALI or thread pool)
    prefetch: int = positive(2)  # batches prepared ahead of the one being consumed
    decode_device: str = choice("auto", DECODE_DEVICES)  # where DALI decodes images
    # mmcv: cv2 INTER_LINEAR images / INTER_NEAREST labels, no antialiasing (DAFormer/HRDA's
    # Resize); antialias: antialiased bilinear, pixel-centre labels. Train and eval, both backends.
    resample: str = choice("mmcv", RESAMPLE)
    seed: int = 0  # used when the caller passes no seed
    mean: List[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    std: List[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])


TRAIN_STREAMS = ("source", "target", "prompt")


def backend_of(cfg) -> str:
    """``data.backend``, with the old name ``wds`` read as ``pil`` (and said once)."""
    if cfg.backend == "wds":
        warnings.warn("data.backend=wds is now called data.backend=pil (PIL decode threads; "
                      "webdataset only reads evaluation shards); please rename it", FutureWarning,
                      stacklevel=3)
        return "pil"
    return cfg.backend


def shard_folders(value, key: str) -> List[str]:
    """A stream's ``shards`` as a list of folders ([] = unused): one folder or several."""
    if value is None or value == "":
        return []
    folders = [value] if isinstance(value, str) else list(value) if _is_sequence(value) else None
    if folders is None or not all(isinstance(f, str) and f for f in folders):
        raise ConfigError(f"{key}: must be a shard folder or a list of shard folders, got {value!r}")
    if len(set(folders)) != len(folders):
        raise ConfigError(f"{key}: lists a folder twice: {folders}")
    return folders


def _is_sequence(value) -> bool:
    return isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig"


def _check_img_scale(cfg, bad) -> None:
    if cfg.img_scale is not None and (len(cfg.img_scale) != 2 or min(cfg.img_scale) < 1):
        bad("img_scale", f"must be [long, short] positive, got {list(cfg.img_scale)}")


def check_eval_stream(cfg, key: str) -> None:
    """Validate one evaluation target; ConfigError names the dotted key."""
    def bad(name, why):
        raise ConfigError(f"{key}.{name}: {why}")

    check_fields(cfg, key + ".")
    shard_folders(cfg.shards, f"{key}.shards")
    _check_img_scale(cfg, bad)
    sets = list(cfg.class_sets)
    if not sets or any(s not in CLASS_SETS for s in sets) or len(set(sets)) != len(sets):
        bad("class_sets", f"must be distinct names among {list(CLASS_SETS)}, got {sets}")


def check_stream(cfg, key: str) -> None:
    """Validate one training stream block; ConfigError names the dotted key (e.g.
    data.source.crop_size)."""
    def bad(name, why):
        raise ConfigError(f"{key}.{name}: {why}")

    check_fields(cfg, key + ".")
    shard_folders(cfg.shards, f"{key}.shards")
    _check_img_scale(cfg, bad)
    if cfg.ratio_range is not None and (len(cfg.ratio_range) != 2 or not
                                        0 < cfg.ratio_range[0] <= cfg.ratio_range[1]):
        bad("ratio_range", f"must be [lo, hi] with 0 < lo <= hi, got {list(cfg.ratio_range)}")
    if cfg.ratio_range is not None and cfg.img_scale is None:
        bad("ratio_range", "needs img_scale")
    if cfg.crop_size is not None and (len(cfg.crop_size) != 2 or min(cfg.crop_size) < 1):
        bad("crop_size", f"must be [H, W] positive, got {list(cfg.crop_size)}")
    mode = cfg.sampling.mode
    if mode not in ("uniform", "random") and not cfg.with_labels:
        bad("sampling.mode", f"{mode} needs labels but with_labels is false")


def check_data_config(cfg, key: str = "data") -> None:
    """Validate the whole data block: every field rule (config_fields), then what relates
    several keys, per stream."""
    check_fields(cfg, key + ".")
    if len(cfg.mean) != 3 or len(cfg.std) != 3 or min(cfg.std) <= 0:
        raise ConfigError(f"{key}.mean/std: need 3 values each, std > 0")
    for name in TRAIN_STREAMS:
        check_stream(getattr(cfg, name), f"{key}.{name}")
    for name, target in cfg.val.items():
        check_eval_stream(target, f"{key}.val.{name}")
    check_eval_stream(cfg.test, f"{key}.test")
