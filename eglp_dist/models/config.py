"""Config of the networks (owned by ``models/``).

``ModelConfig`` is an OmegaConf structured config: the run config's ``model`` node is
validated against it, and ``configs/model/NAME.yaml`` holds its fields at top level
(``defaults: [model: NAME]`` or ``model=NAME`` on the command line merges it into ``model``).
Only plain types are used (str/int/float/bool/Optional/List/Dict/nested dataclasses) so
OmegaConf can type-check every key and reject unknown ones.

The defaults are the paper settings of DAFormer/HRDA on MiT-b5; tiny CPU variants only
change sizes (see ``configs/model/tiny_*.yaml``), never code paths.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from eglp_dist.config_fields import check_fields, choice, in_range, non_negative, positive, probability

HEAD_TYPES = ("daformer", "deeplabv3plus")
STAT_PROMPT_MODES = ("np", "np_plus")


@dataclass
class HeadConfig:
    """Decode head. ``daformer``: per-level 1x1 embeddings, upsample to stride 4, concat,
    depthwise-separable ASPP fusion (DAFormer). ``deeplabv3plus``: ASPP with image pooling on
    the last level plus a projected stride-4 skip (DeepLabV3+, as in RobustNet)."""

    type: str = choice("daformer", HEAD_TYPES)
    # DAFormer: width of each level's 1x1 embedding (DAFormer's decoder_params.embed_dims).
    embed_dim: int = positive(256)
    # Width after fusion (DAFormer ``channels``) / ASPP and decoder width (DeepLabV3+).
    channels: int = positive(256)
    # ASPP dilations; a 1 is the 1x1 branch. DeepLabV3+ at output stride 8 uses 1, 12, 24, 36.
    dilations: List[int] = field(default_factory=lambda: [1, 6, 12, 18])
    # Dropout2d before the classifier (mmseg ``dropout_ratio``); RobustNet's DeepLabV3+ uses 0.
    dropout: float = in_range(0.1, 0, 1, hi_open=True)
    # DeepLabV3+ only: width of the stride-4 skip projection.
    low_level_channels: int = positive(48)


@dataclass
class HRDAConfig:
    """HRDA multi-resolution training and inference (Hoyer et al., ECCV 2022).

    Training: the crop is seen as a low-resolution *context* view (downscaled by
    ``context_scale``) and a high-resolution *detail* crop of ``detail_crop`` pixels at a random
    offset (multiple of ``crop_divisible``). A scale-attention head on the context features
    weighs detail against context per pixel (and per class). Inference: detail windows of
    ``detail_crop`` slide over the image with ``detail_stride`` and are fused with context.
    """

    enabled: bool = False
    context_scale: float = in_range(0.5, 0, 1, lo_open=True, hi_open=True)
    detail_crop: List[int] = field(default_factory=lambda: [512, 512])  # (h, w) in input pixels
    crop_divisible: int = positive(8)
    # Stride of the sliding detail windows at inference; None = half the crop (HRDA's overlap).
    detail_stride: Optional[List[int]] = None
    hr_loss_weight: float = non_negative(0.1)
    lr_loss_weight: float = non_negative(0.0)
    attention_embed_dim: int = positive(256)
    attention_classwise: bool = True  # one attention map per class (HRDA default)
    # A constant attention instead of the learned head (HRDA's ``fixed_attention``); for
    # ablations and for the identity tests.
    fixed_attention: Optional[float] = probability(None)


@dataclass
class SPNConfig:
    """SPN: multi-resolution encoder input and MSFFP stochastic hybrid prompts.

    See ``eglp_dist/models/spn.py`` for which parts follow the SPN README and which are our
    reading of it (with MRFP, CVPR 2024, as the public ancestor).
    """

    enabled: bool = False
    # The image is encoded at each scale by the shared encoder; the first must be 1.0 (the
    # stream the decoder sees), the others are fused into it.
    input_scales: List[float] = field(default_factory=lambda: [1.0, 0.5])
    # Feature levels (0 = stride 4 ... 3 = last) where the scales are fused.
    fuse_levels: List[int] = field(default_factory=lambda: [0, 1, 2, 3])
    # Fused levels that receive the stochastic prompts (training mode only).
    prompt_levels: List[int] = field(default_factory=lambda: [0, 1])
    # Probability, drawn once per forward and per prompt kind, that a prompt is applied.
    prompt_prob: float = probability(0.5)
    # High-frequency prompt: a frozen conv encoder-decoder, re-drawn at random on each use.
    hf_prompt: bool = True
    hf_channels: int = positive(64)
    hf_depth: int = positive(2)
    hf_scale: float = in_range(0.8, 0, 1, lo_open=True)  # resize factor per encoder step (inverted in the decoder)
    # Feature-statistics prompt: alpha * (f - mu) + beta * mu, alpha and beta ~ N(1, std).
    stat_prompt: bool = True
    stat_mode: str = choice("np_plus", STAT_PROMPT_MODES)  # np | np_plus (beta's spread scaled per channel, as MRFP)
    alpha_std: float = non_negative(0.75)
    beta_std: float = non_negative(0.75)


@dataclass
class ModelConfig:
    """A segmentor: encoder + decode head, optionally HRDA or SPN around them."""

    name: str = "daformer_mitb5"  # a label for logs; the architecture is the fields below
    # Encoder: ``mit_b0..mit_b5`` (SegFormer's MiT, built as timm pvt_v2 with MLP ratio 4),
    # any timm name with features_only support (``pvt_v2_b*``, ``resnet50``, ``resnet101``...).
    encoder: str = "mit_b5"
    # Local file with encoder weights (timm layout, or SegFormer/mmseg ``mit_b*.pth`` layout).
    # Nothing is ever downloaded.
    pretrained: Optional[str] = None
    # A run's checkpoint (folder, ``checkpoints/`` or ``latest``) or a weight file holding the
    # *whole* segmentor (encoder, heads, HRDA attention), loaded strictly after ``pretrained``:
    # self-training started from a source-trained model (tools/ablate.py's warm start).
    init_from: Optional[str] = None
    drop_path_rate: float = non_negative(0.1)  # SegFormer/DAFormer use 0.1 on MiT
    # CNN encoders: output stride 8 or 16 via dilation (DeepLab); None = native (32).
    output_stride: Optional[int] = choice(None, (None, 8, 16, 32))
    # ResNet stem: "" (one 7x7 conv) or "deep" (three 3x3 convs, 64-64-128, as ResNet-101 in
    # RobustNet/MRFP).
    stem: str = choice("", ("", "deep"))
    # Extra keyword arguments for ``timm.create_model`` (e.g. ``layers: [1, 1, 1, 1]`` for a
    # tiny ResNet in tests).
    encoder_kwargs: Dict[str, Any] = field(default_factory=dict)
    # Recompute each encoder stage in backward to save memory.
    grad_checkpointing: bool = False
    num_classes: int = positive(19)
    ignore_index: int = 255
    # False: the CE mean is over all pixels, ignored ones included (mmseg 0.x, which DAFormer
    # and HRDA use). True: over non-ignored pixels only (torch's CE, RobustNet).
    loss_avg_non_ignore: bool = False
    head: HeadConfig = field(default_factory=HeadConfig)
    hrda: HRDAConfig = field(default_factory=HRDAConfig)
    spn: SPNConfig = field(default_factory=SPNConfig)
    # Whole-image sliding window at test time (``forward``/``infer``); None = whole image.
    test_window: Optional[List[int]] = None
    test_stride: Optional[List[int]] = None
    # Run all windows of one image as one batch (faster, more memory).
    batched_slide: bool = True


def as_model_config(cfg: Any) -> ModelConfig:
    """A ``ModelConfig`` from a ModelConfig, an OmegaConf node or a plain dict.

    Unknown keys and wrongly typed values raise ``ConfigError`` naming ``model.KEY``.
    """
    from omegaconf import DictConfig, OmegaConf

    from eglp_dist.config_merge import merge_checked

    if isinstance(cfg, ModelConfig):
        out = cfg
    else:
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        node = merge_checked(OmegaConf.structured(ModelConfig), OmegaConf.create(cfg or {}), "", "model.")
        out = OmegaConf.to_object(node)
    validate(out)
    return out


def load_model_config(name_or_path: str, overrides: Optional[Dict[str, Any]] = None) -> ModelConfig:
    """Read ``configs/model/NAME.yaml`` (or a YAML path) into a validated ``ModelConfig``.

    ``overrides`` are dotted keys relative to the model node, e.g. ``{"hrda.enabled": False}``.
    Used by tests and tools; runs get the model node from the run config.
    """
    # Same composition and key checks as a run config's `model` node (config.py), so a model
    # file may use `defaults:` and an unknown key is named with its closest valid one.
    from pathlib import Path

    from omegaconf import OmegaConf

    from eglp_dist.config_merge import PACKAGE_CONFIG_ROOT, compose_file, merge_checked
    from eglp_dist.errors import ConfigError

    path = Path(name_or_path)
    if not path.is_file():
        path = PACKAGE_CONFIG_ROOT / "model" / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"model config {name_or_path!r}: no such file ({path})")
    node = merge_checked(OmegaConf.structured(ModelConfig), compose_file(path), str(path), "model.")
    for key, value in (overrides or {}).items():
        part = OmegaConf.create({})
        OmegaConf.update(part, key, value, merge=False)
        node = merge_checked(node, part, f"override {key}={value!r}", "model.")
    cfg = OmegaConf.to_object(node)
    validate(cfg)
    return cfg


def validate(cfg: ModelConfig) -> None:
    """Reject values the networks cannot be built from, naming the key."""
    from eglp_dist.errors import ConfigError

    def bad(key: str, why: str) -> None:
        raise ConfigError(f"model.{key}: {why}")

    check_fields(cfg, "model.")  # choices and bounds of single fields (config_fields)
    if not cfg.head.dilations or any(d < 1 for d in cfg.head.dilations):
        bad("head.dilations", f"must be positive integers, got {list(cfg.head.dilations)}")
    for key in ("test_window", "test_stride"):
        value = getattr(cfg, key)
        if value is not None and (len(value) != 2 or min(value) < 1):
            bad(key, f"must be [h, w] of positive ints, got {list(value)}")
    if (cfg.test_window is None) != (cfg.test_stride is None):
        bad("test_stride", "test_window and test_stride are set together")
    if cfg.hrda.enabled and cfg.spn.enabled:
        bad("spn.enabled", "HRDA and SPN cannot be combined")
    h = cfg.hrda
    if h.enabled:
        if len(h.detail_crop) != 2 or min(h.detail_crop) < 1:
            bad("hrda.detail_crop", f"must be [h, w], got {list(h.detail_crop)}")
        if h.crop_divisible % 4:
            # The detail box must land on whole pixels of the stride-4 logits.
            bad("hrda.crop_divisible", f"must be a multiple of 4 (the logits' stride), got {h.crop_divisible}")
        if h.detail_stride is not None and (len(h.detail_stride) != 2 or min(h.detail_stride) < 1):
            bad("hrda.detail_stride", f"must be [h, w] or null, got {list(h.detail_stride)}")
        if not 0.0 <= h.hr_loss_weight + h.lr_loss_weight <= 1.0:
            bad("hrda.hr_loss_weight", "hr_loss_weight + lr_loss_weight must be in [0, 1]")
    s = cfg.spn
    if s.enabled:
        if not s.input_scales or s.input_scales[0] != 1.0 or any(x <= 0 for x in s.input_scales):
            bad("spn.input_scales", f"must start with 1.0 and be positive, got {list(s.input_scales)}")
        for key in ("fuse_levels", "prompt_levels"):
            levels = getattr(s, key)
            if any(not 0 <= lvl <= 3 for lvl in levels):
                bad(f"spn.{key}", f"levels are 0..3, got {list(levels)}")

