"""Config of the training recipe (owned by methods/): which method, and each UDA part with
its DAFormer/HRDA/MIC default so that every part can be switched or tuned from the config.

Defaults are the published ones: DAFormer (``configs/_base_/uda/dacs_a999_fdthings.py``:
alpha 0.999, pseudo threshold 0.968, colour jitter strength 0.2 applied with p 0.8, blur
p 0.5, FD lambda 0.005 on classes 6, 7, 11-18 with 0.75 majority downscaling), HRDA (its
multi-resolution forward is the model's, ``model.hrda``) and MIC (64-pixel blocks, mask
ratio 0.7, loss weight 1; off by default as in HRDA).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from eglp_dist.config_fields import choice, class_list, in_range, non_negative, positive, probability

DAFORMER_FD_CLASSES = [6, 7, 11, 12, 13, 14, 15, 16, 17, 18]  # "things" of Cityscapes' 19


@dataclass
class TeacherConfig:
    alpha: float = probability(0.999)  # alpha_t = min(1 - 1/(t+1), alpha)


@dataclass
class PseudoLabelConfig:
    threshold: float = positive(0.968)  # confidence weight = share of pixels with max prob >= this
    ignore_top: int = non_negative(0)  # rows at the top of the target crop weighted 0 (DAFormer: 15)
    ignore_bottom: int = non_negative(0)  # rows at the bottom weighted 0 (DAFormer: 120, the ego car; HRDA GTA->CS: 240)
    ignore_left: int = non_negative(0)  # columns at the left weighted 0 (PIG: 30)
    ignore_right: int = non_negative(0)  # columns at the right weighted 0 (PIG: 30)


@dataclass
class MixConfig:
    enabled: bool = True  # ClassMix of source classes onto the target
    jitter_p: float = probability(0.8)  # colour jitter probability (DAFormer: U > 0.2)
    jitter_strength: float = non_negative(0.2)
    blur_p: float = probability(0.5)
    blur_sigma: List[float] = field(default_factory=lambda: [0.15, 1.15])


@dataclass
class FeatureDistanceConfig:
    enabled: bool = True
    weight: float = non_negative(0.005)  # DAFormer's imnet_feature_dist_lambda
    classes: Optional[List[int]] = class_list(DAFORMER_FD_CLASSES)  # None: all
    min_ratio: float = in_range(0.75, 0, 1, lo_open=True)  # majority rule when downscaling the label to the features


@dataclass
class MaskingConfig:
    """MIC masked image consistency on the target (Hoyer et al., CVPR 2023)."""
    enabled: bool = False
    block_size: int = positive(64)
    ratio: float = probability(0.7)  # share of blocks hidden
    weight: float = non_negative(1.0)
    color_aug: bool = True  # MIC jitters/blurs the target before masking


# PIG keeps the UDA teacher's label where it predicts one of these (traffic light, traffic
# sign, bus, train, motorcycle, bicycle): small or rare classes NFNet's few prompts rarely hold.
PIG_PROTECTED = [6, 7, 15, 16, 17, 18]


@dataclass
class NFNetConfig:
    """PIG's Night-Focused Network: a second segmentor (a second engine, with its own EMA
    teacher) trained on night images only. Its ``model``/``optim``/``schedule``/``engine``
    nodes hold overrides of the student's top-level nodes (empty: the student's settings)."""
    enabled: bool = True
    model: Dict[str, Any] = field(default_factory=dict)
    optim: Dict[str, Any] = field(default_factory=dict)
    schedule: Dict[str, Any] = field(default_factory=dict)
    engine: Dict[str, Any] = field(default_factory=dict)
    prompt_loss: bool = True  # supervised loss on the prompt crop
    dark_mix: bool = True  # half of the prompt crop pasted onto the target crop
    ams: bool = True  # odd iterations: the dark mix with blocks masked (AMS); even: as is (PMS)
    ams_block_size: int = positive(64)
    ams_ratio: float = probability(0.7)


@dataclass
class FusionConfig:
    """PIG's fusion: the classes least similar between each source and target image take the
    NFNet teacher's label, except where the UDA teacher predicts a protected class."""
    enabled: bool = True
    similarity: str = choice("stats", ["stats", "lpips"])  # lpips: PIG's; stats: ours, weight-free
    top_k: int = positive(4)
    protected: List[int] = class_list(PIG_PROTECTED)
    lpips_alexnet: Optional[str] = None  # torchvision AlexNet state_dict file (similarity=lpips)


# EGLP's rare classes by default: the small dynamic ones (traffic light, traffic sign, person,
# rider, car, truck, bus, train, motorcycle, bicycle).
EGLP_RARE = [6, 7, 11, 12, 13, 14, 15, 16, 17, 18]


@dataclass
class DNISConfig:
    """Day-Night Image Similarity per class (methods/parts/dnis.py)."""
    enabled: bool = True
    momentum: float = probability(0.99)  # EMA of the class sums over steps
    temperature: float = positive(0.5)  # DNIS = exp(-distance / temperature)
    min_confidence: float = probability(0.968)  # target pixels count as night evidence from here


@dataclass
class FISConfig:
    """Fusion of pseudo-labels via image similarity: low-DNIS classes take NFNet's label
    (after DMS's mix when DMS is on: the two are stages of one pipeline, docs/eglp.md)."""
    enabled: bool = True
    mode: str = choice("bottom_k", ["bottom_k", "threshold"])
    k: int = positive(4)
    threshold: float = probability(0.5)  # DNIS lies in [0, 1]
    protected: List[int] = class_list(PIG_PROTECTED)


@dataclass
class DMSConfig:
    """Dynamic mixing: DNIS-weighted mix of the two teachers' probabilities (then FIS, when
    on, hands its classes to NFNet) and prompt classes pasted into the mixed images (also
    without NFNet: the weights come from DNIS alone)."""
    enabled: bool = True
    gamma: float = positive(1.0)  # weight = ((max DNIS - DNIS) / range) ** gamma * max_weight
    max_weight: float = probability(0.75)  # NFNet's largest share: UDA keeps >= 25 % everywhere
    prompt_rate: float = probability(0.5)  # P(paste prompt class c) = prompt_rate * weight_c (<= 1)


@dataclass
class RCMConfig:
    """Rare Class Memory (methods/parts/rcm.py)."""
    enabled: bool = True
    classes: List[int] = class_list(EGLP_RARE)
    capacity: int = positive(32)  # patches per class
    patch: int = positive(64)  # patch side in pixels (crops of the training resolution)
    min_pixels: int = positive(64)  # a class needs this many pixels in an image to be stored
    paste_per_image: int = non_negative(2)
    night_adjust: bool = True  # day patches moved towards night photometry (DNIS's shift)
    class_thresholds: bool = True  # label level: confident rare-class pixels weigh 1 (methods/parts/rcm.py)
    momentum: float = probability(0.99)  # EMA of the confidence sums
    day_patches_to_nfnet: bool = False  # NFNet's dark mix gets night (prompt) patches only


@dataclass
class EGLPConfig:
    dnis: DNISConfig = field(default_factory=DNISConfig)
    fis: FISConfig = field(default_factory=FISConfig)
    dms: DMSConfig = field(default_factory=DMSConfig)
    rcm: RCMConfig = field(default_factory=RCMConfig)


@dataclass
class DGAugConfig:
    """SPN's photometric augmentation of the source (methods/parts/dg_aug.py): RobustNet's GTAV
    baseline, torchvision ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.5 and Gaussian blur with
    sigma ~ U(0.15, 1.3) on every image (``datasets/__init__.py:74-81``)."""
    enabled: bool = True
    jitter_p: float = probability(0.5)
    brightness: float = non_negative(0.4)
    contrast: float = non_negative(0.4)
    saturation: float = non_negative(0.4)
    hue: float = in_range(0.1, 0, 0.5)  # in turns
    blur_p: float = probability(1.0)
    blur_sigma: List[float] = field(default_factory=lambda: [0.15, 1.3])


@dataclass
class DiagnosticsConfig:
    """Measurements that never touch the loss (methods/parts/pseudo_iou.py)."""
    # pseudo-label IoU of every pseudo-label source against the target's ground truth:
    # null (auto) = on when the target's shards hold labels; true = an error if they do not
    pseudo_label_iou: Optional[bool] = None


# The method nodes each recipe reads (beside ``name``); a key set in another node has no
# effect, and load_config says so (config.load_config).
NODES_USED = {
    "source_only": (),
    "spn": ("dg_aug",),
    "uda": ("teacher", "pseudo", "mix", "fd", "mic", "diagnostics"),
    "pig": ("teacher", "pseudo", "mix", "fd", "mic", "diagnostics", "nfnet", "fusion"),
    "eglp": ("teacher", "pseudo", "mix", "fd", "mic", "diagnostics", "nfnet", "fusion", "eglp"),
}


@dataclass
class MethodConfig:
    name: str = choice("source_only", ["source_only", "uda", "pig", "eglp", "spn"])
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    pseudo: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    fd: FeatureDistanceConfig = field(default_factory=FeatureDistanceConfig)
    mic: MaskingConfig = field(default_factory=MaskingConfig)
    nfnet: NFNetConfig = field(default_factory=NFNetConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    eglp: EGLPConfig = field(default_factory=EGLPConfig)
    dg_aug: DGAugConfig = field(default_factory=DGAugConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
