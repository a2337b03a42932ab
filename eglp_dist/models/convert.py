"""Encoder weight files: read them, recognise their key layout, convert to timm's.

Two layouts of the same MiT weights exist in the wild:

* **SegFormer** (``mix_transformer.py`` of SegFormer, DAFormer, HRDA, EGLP; the
  ``pretrained/mit_b*.pth`` those repositories load): ``patch_embed1.proj``,
  ``block1.0.attn.q``, ``block1.0.attn.kv``, ``block1.0.attn.sr``, ``block1.0.mlp.dwconv.dwconv``,
  ``norm1`` ... plus the ImageNet classifier ``head.*``.
* **timm** (``pvt_v2``, what our encoder is built from): ``patch_embed.proj``,
  ``stages.0.blocks.0.attn.q``, ``stages.1.downsample.proj``, ``stages.0.norm`` ...

The key mapping is timm's own ``pvt_v2.checkpoint_filter_fn`` (used, not rewritten). This
module adds what a user needs around it: picking the encoder out of whole-segmentor
checkpoints (``backbone.`` prefixes; reading the file and unwrapping ``state_dict``/``model``
containers and ``module.`` prefixes is ``eglp_dist.weights``', shared with ``eglp eval``),
telling the layouts apart and inferring the MiT variant from tensor shapes (``eglp
convert-mit`` is ``models/convert_mit.py``).
Loading (``backbones.load_encoder_weights``) accepts either layout directly; converting
once just makes the file loadable by plain timm as well.
"""
from __future__ import annotations

import re
from typing import Dict, Tuple


from eglp_dist.errors import UserError
from eglp_dist.weights import StateDict, read_weight_file

# SegFormer's MiT variants: (depths, widths). All use MLP ratio 4, heads (1, 2, 5, 8) and
# reduction ratios (8, 4, 2, 1) (SegFormer mix_transformer.py).
MIT_VARIANTS: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {
    "mit_b0": ((2, 2, 2, 2), (32, 64, 160, 256)),
    "mit_b1": ((2, 2, 2, 2), (64, 128, 320, 512)),
    "mit_b2": ((3, 4, 6, 3), (64, 128, 320, 512)),
    "mit_b3": ((3, 4, 18, 3), (64, 128, 320, 512)),
    "mit_b4": ((3, 8, 27, 3), (64, 128, 320, 512)),
    "mit_b5": ((3, 6, 40, 3), (64, 128, 320, 512)),
}

# Where the encoder sits inside whole-model checkpoints: mmseg segmentors, the student of
# DAFormer/HRDA's UDA wrapper, our Segmentor, our SPN Segmentor.
ENCODER_PREFIXES = ("backbone.", "model.backbone.", "encoder.net.", "encoder.encoder.net.")

# Top-level modules of a full timm classifier that a features-only encoder does not have.
CLASSIFIER_MODULES = ("head", "fc", "classifier")


def read_state_dict(path: str) -> StateDict:
    """Load a weight file and unwrap it to a flat ``{key: tensor}`` of encoder weights.

    Reading and unwrapping are ``weights.read_weight_file``'s (tensor-only load, bare state
    dict or ``{"state_dict": ...}`` / ``{"model": ...}`` containers of mmcv and DeepSpeed
    exports, DDP ``module.`` prefixes; DataError, a UserError, naming the file). This adds
    one step: of a whole-model checkpoint, only the encoder's keys (the first of
    ``ENCODER_PREFIXES`` found, prefix removed) are kept.
    """
    return encoder_part(read_weight_file(path))


def encoder_part(sd: StateDict) -> StateDict:
    """The encoder's keys of a whole-model state dict (prefix removed); ``sd`` itself if no
    key starts with one of ``ENCODER_PREFIXES``."""
    for prefix in ENCODER_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def detect_layout(sd: StateDict) -> str:
    """``segformer`` for SegFormer/mmseg-0.x MiT keys, ``timm`` otherwise."""
    if any(k.startswith("patch_embed1.") or re.match(r"block\d+\.", k) for k in sd):
        return "segformer"
    if any(k.startswith("layers.") and ".projection." in k for k in sd):
        raise UserError("mmseg 1.x MiT layout (layers.N.0.projection...) is not supported; "
                        "use SegFormer's original mit_b*.pth (keys patch_embed1.proj, block1.0...)")
    return "timm"


def to_timm_layout(sd: StateDict) -> Tuple[StateDict, Dict[str, str]]:
    """SegFormer keys -> timm ``pvt_v2`` keys (timm's ``checkpoint_filter_fn``); timm keys pass.

    Returns the converted state dict and, for error messages, each new key's name in the
    file. The ImageNet classifier (``head.*``) is dropped: a segmentation encoder has none.
    """
    out: StateDict = {}
    origins: Dict[str, str] = {}
    segformer = detect_layout(sd) == "segformer"
    if segformer:
        from timm.models.pvt_v2 import checkpoint_filter_fn
    for key, value in sd.items():
        new = next(iter(checkpoint_filter_fn({key: value}, None))) if segformer else key
        if new.split(".", 1)[0] in CLASSIFIER_MODULES:
            continue
        if new in out:
            raise UserError(f"keys {origins[new]!r} and {key!r} both map to {new!r}")
        out[new] = value
        origins[new] = key
    return out, origins


def infer_mit_variant(sd: StateDict, path: str = "<state dict>") -> str:
    """The ``mit_bN`` whose widths and depths match a timm-layout MiT state dict."""
    try:
        widths = tuple(int(sd[f"stages.{i}.norm.weight"].shape[0]) for i in range(4))
    except KeyError as exc:
        raise UserError(f"{path}: no MiT stage norm {exc.args[0]!r}; not MiT weights") from None
    depths = []
    for i in range(4):
        blocks = {int(m.group(1)) for k in sd for m in [re.match(rf"stages\.{i}\.blocks\.(\d+)\.", k)] if m}
        depths.append(max(blocks) + 1 if blocks else 0)
    for name, (ref_depths, ref_widths) in MIT_VARIANTS.items():
        if tuple(depths) == ref_depths and widths == ref_widths:
            return name
    raise UserError(f"{path}: widths {widths} and depths {tuple(depths)} match no MiT variant "
                    f"({', '.join(MIT_VARIANTS)})")
