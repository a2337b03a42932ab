"""RobustNet's photometric augmentation of the source images, as SPN's recipe uses it.

SPN's README adopts RobustNet's class-uniform sampling and publishes no training code; its
augmentation is taken from RobustNet's GTAV baseline (``shachoi/RobustNet`` at 1ff5c047,
``scripts/train_r50os16_gtav_base.sh`` and ``datasets/__init__.py``), which applies, per
training image after the random scale, crop and flip:

* ``--color_aug 0.5`` (a switch; the value is unused): ``RandomApply([ColorJitter(0.4, 0.4,
  0.4, 0.1)], p=0.5)`` (``datasets/__init__.py:74-76``), torchvision's ColorJitter: brightness,
  contrast and saturation factors ~ U(0.6, 1.4), hue shift ~ U(-0.1, 0.1) turns, the four in a
  random order;
* ``--gblur``: ``RandomGaussianBlur`` always (``datasets/__init__.py:80-81``), sigma = 0.15 +
  U(0, 1) * 1.15 (``transforms/transforms.py:160-161``) through ``skimage.filters.gaussian``,
  i.e. scipy's Gaussian filter: kernel radius ``int(4 * sigma + 0.5)``, border ``nearest``.

Ours runs on the normalised batch on the training device (not on PIL images in loader
workers): the colour operations are torchvision's own tensor functions
(``transforms.v2.functional.adjust_*``, the same maths as their PIL versions up to uint8
rounding), the blur a separable truncated Gaussian with edge replication. Every random
number comes from the method's generator, a fixed :data:`N_UNIFORMS` per image, so a resumed
run draws what the uninterrupted one would have.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from eglp_dist.device_constants import constant, to_device_async
from eglp_dist.methods.parts.strong_aug import gaussian_kernel1d

N_UNIFORMS = 11  # apply-jitter, apply-blur, 4 factors, 4 order keys, sigma


def _color_ops():
    import eglp_dist  # noqa: F401  (the torchvision import shim for CPU builds of torch)
    from torchvision.transforms.v2 import functional as TF

    return (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def blur_radius(sigma: float, truncate: float = 4.0) -> int:
    """scipy.ndimage.gaussian_filter's kernel radius (skimage's gaussian uses it)."""
    return int(truncate * float(sigma) + 0.5)


def gaussian_blur_nearest(image: Tensor, sigma: float) -> Tensor:
    """One (C, H, W) image blurred with scipy's truncated kernel and ``nearest`` borders."""
    r = blur_radius(sigma)
    if r < 1:
        return image
    k = gaussian_kernel1d(2 * r + 1, torch.tensor([float(sigma)], dtype=torch.float64))[0]
    k = to_device_async(k, image.device, image.dtype)
    c = image.shape[0]
    x = F.pad(image[None], (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)[0]


def photometric_augment(images: Tensor, mean: Sequence[float], std: Sequence[float],
                        generator: torch.Generator, cfg) -> Tensor:
    """RobustNet's colour jitter and blur of a normalised (B, 3, H, W) batch (``cfg``: the
    ``method.dg_aug`` node). Padding is not excluded: RobustNet pads after augmenting, ours
    pads before (zeros in normalised space), a difference only at crops beyond the image."""
    b = images.shape[0]
    u = torch.rand((b, N_UNIFORMS), generator=generator, device=generator.device).to("cpu", torch.float64)
    m = constant(list(mean), images.device, images.dtype, (3, 1, 1))
    s = constant(list(std), images.device, images.dtype, (3, 1, 1))
    ops = _color_ops()
    strengths = (cfg.brightness, cfg.contrast, cfg.saturation)
    out = []
    for i in range(b):
        x = images[i]
        if u[i, 0] < cfg.jitter_p:
            x01 = ((x * s + m) / 255.0).clamp(0.0, 1.0)
            factors = [1.0 + st * (2.0 * float(u[i, 2 + j]) - 1.0) for j, st in enumerate(strengths)]
            factors = [max(0.0, f) for f in factors] + [cfg.hue * (2.0 * float(u[i, 5]) - 1.0)]
            for op in torch.argsort(u[i, 6:10]).tolist():  # torchvision: a random order
                x01 = ops[op](x01, factors[op])
            x = (x01 * 255.0 - m) / s
        if u[i, 1] < cfg.blur_p:
            lo, hi = cfg.blur_sigma
            x = gaussian_blur_nearest(x, lo + (hi - lo) * float(u[i, 10]))
        out.append(x)
    return torch.stack(out)
