"""Small constant tensors on a device, made once per (values, shape, device, dtype).

A tensor built from a Python list on a GPU (``torch.tensor(mean, device=cuda)``) is a
*blocking* host-to-device copy: the host waits until the GPU has finished everything queued
before it, which empties the launch queue in the middle of a step. The normalisation mean/std,
a Sobel kernel, a class list: made once here and reused. The tensors are shared: never
modify one in place.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch

_CACHE: Dict[Tuple[Any, ...], torch.Tensor] = {}


def constant(values: Any, device, dtype: torch.dtype = torch.float32,
             shape: Optional[Sequence[int]] = None) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype)
    if shape is not None:
        host = host.reshape(tuple(shape))
    key = (tuple(host.flatten().tolist()), tuple(host.shape), str(torch.device(device)), dtype)
    cached = _CACHE.get(key)
    if cached is None:
        cached = _CACHE[key] = host.to(device)
    return cached


def to_device_async(t: torch.Tensor, device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A per-step host draw (random parameters, indices) on ``device`` without waiting for
    the GPU: a ``non_blocking`` copy from pageable memory is staged by the driver at once and
    does not synchronise the device."""
    return t.to(device=device, dtype=dtype, non_blocking=True)


def class_mask(classes: Sequence[int], n: int, device) -> torch.Tensor:
    """(n,) bool, True at ``classes`` (a protected or rare class list), made once."""
    chosen = {int(c) for c in classes}
    return constant([i in chosen for i in range(n)], device, torch.bool)
