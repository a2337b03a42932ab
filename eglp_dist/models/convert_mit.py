"""``eglp convert-mit SRC DST``: a SegFormer/mmseg or timm MiT weight file -> timm layout,
checked by loading it strictly into the encoder it names. The key mapping itself is
``models/convert.py`` (which the encoders use to read either layout); this command sits above
both it and ``models/backbones.py``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

from eglp_dist.atomic import torch_save_atomic
from eglp_dist.errors import UserError
from eglp_dist.models.backbones import create_encoder
from eglp_dist.models.convert import detect_layout, infer_mit_variant, read_state_dict, to_timm_layout


def convert_mit(src: str, dst: str, variant: Optional[str] = None) -> Dict[str, Any]:
    """Convert ``src`` (either layout) to a timm-layout ``dst`` after a strict load check.

    Returns a summary (variant, layout, number of tensors and parameters).
    """
    sd = read_state_dict(src)
    layout = detect_layout(sd)
    timm_sd, origins = to_timm_layout(sd)
    inferred = infer_mit_variant(timm_sd, src)
    name = variant or inferred
    encoder = create_encoder(name)
    encoder.load_timm_state_dict(timm_sd, source=src, origins=origins)  # strict
    torch_save_atomic(timm_sd, dst)
    return {
        "variant": name,
        "inferred": inferred,
        "layout": layout,
        "tensors": len(timm_sd),
        "params": sum(v.numel() for k, v in timm_sd.items() if not k.endswith("num_batches_tracked")),
    }


def run_cli(args) -> int:
    """``eglp convert-mit SRC DST [--variant NAME]``."""
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        raise UserError(f"{args.dst}: destination must differ from the source")
    info = convert_mit(args.src, args.dst, args.variant)
    print(f"{args.src} ({info['layout']} layout, {info['variant']}) -> {args.dst}: "
          f"{info['tensors']} tensors, {info['params'] / 1e6:.2f}M parameters, loads strictly")
    return 0
