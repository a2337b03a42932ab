"""Precision of the training engines and evaluation, in one place.

fp32 on CPU; on CUDA (``auto``) or with ``bf16``, bf16 autocast around the forward with fp32
parameters and fp32 optimizer state in both engines, so DDP and ZeRO compute the same thing;
``tf32`` lets fp32 matmuls use TF32 tensor cores. Evaluation enters the same context."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def apply_matmul_precision(precision: str) -> None:
    """``tf32``: fp32 matmuls on TF32 tensor cores (Ampere and later; 10-bit mantissa inputs,
    fp32 accumulation), as cuDNN convolutions already are by torch's default. Every other
    setting keeps torch's default (full-precision matmuls), so ``fp32`` means what it says
    for MiT's Linear layers. Process-wide, like the flags it sets."""
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


def autocast(device: torch.device | str, dtype: Optional[torch.dtype]):
    """Autocast to ``dtype`` on ``device``'s type, or nothing when ``dtype`` is None (fp32);
    training engines and evaluation use the same context."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
