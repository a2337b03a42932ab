"""DAFormer's strong photometric augmentation of the mixed (and MIC-masked) images, in plain torch.

DAFormer (``mmseg/models/utils/dacs_transforms.py``: ``strong_transform`` -> ``color_jitter`` ->
``gaussian_blur``, with ``kornia==0.5.8`` pinned in its ``requirements.txt``) does, per mixed
image:

* colour jitter when ``U(0,1) > color_jitter_p`` (0.2, i.e. applied with probability 0.8):
  denormalise to [0, 1] (``img * std + mean) / 255``), ``kornia.augmentation.ColorJitter(
  brightness=s, contrast=s, saturation=s, hue=s)`` with s = 0.2, renormalise;
* Gaussian blur when ``U(0,1) > 0.5``: sigma ~ U(0.15, 1.15), the same in x and y, kernel size
  per axis ``floor(ceil(0.1 * n) - 0.5 + ceil(0.1 * n) % 2)``, i.e. ``c = ceil(0.1 * n)`` if
  ``c`` is odd else ``c - 1`` (51 for 512, 103 for 1024), ``kornia.filters.GaussianBlur2d`` whose
  default border is ``'reflect'`` (``F.pad(mode='reflect')``).

kornia 0.5.8's ``ColorJitter`` (``kornia/augmentation/augmentation.py``, its parameter
generator ``random_color_jitter_generator`` and ``kornia/enhance/adjust.py``), replicated here:

* factors per image: brightness ``b ~ U(max(0, 1-s), min(2, 1+s))``, contrast and saturation
  ``~ U(max(0, 1-s), 1+s)``, hue ``~ U(max(-0.5, -s), min(0.5, s))`` (in turns; kornia
  multiplies by 2 pi and works in radians);
* the four adjustments run in a random order (``torch.randperm(4)``);
* brightness is **additive**: ``clamp(x + (b - 1), 0, 1)``; contrast is **multiplicative**
  without a mean: ``clamp(x * c, 0, 1)`` (OpenCV-style, not torchvision's blends);
  saturation scales HSV ``S`` and clamps it to [0, 1]; hue adds to HSV ``H`` modulo a turn.
  (kornia >= 0.6 changed these semantics; DAFormer ran 0.5.8.)

Our implementation:

* hue: RGB -> HSV -> RGB with the hexcone formulas kornia uses (``kornia/color/hsv.py``), but
  ``S = delta / V`` exactly (0 where ``V = 0``) where kornia uses ``delta / (V + 1e-6)``, so a
  zero shift and a full turn give back the input to float rounding;
* saturation: in closed form, without the HSV round trip. With H and V fixed every RGB channel
  is ``V - V * S * g(H)``, so scaling S by f (clamped at 1) gives ``c' = V - (V - c) *
  min(f, V / delta)`` -- the same numbers as kornia's HSV route, up to rounding (tested);
* blur: the same normalised, truncated Gaussian kernel and reflect padding, applied as two
  separable 1-D passes (the 2-D kernel is their outer product; only rounding differs).

Deliberate differences:

1. Randomness comes from the explicit ``torch.Generator`` (a fixed 11 uniforms per image,
   whatever is applied, so the stream position never depends on the draws), not python's
   ``random``, numpy and torch's global RNG.
2. Apply-or-not is decided **per image**. DAFormer draws the jitter and blur decisions once per
   iteration (``strong_parameters`` in ``dacs.py``) and shares them across the batch, while
   factors, order and sigma are per image; each image sees the same marginal probabilities
   either way, but per image the result does not depend on the per-rank batch size.
3. After the jitter the [0, 1] image is clamped once more before renormalising. kornia's
   brightness/contrast clamp and the HSV operations stay inside [0, 1] on [0, 1] input, so
   this only removes float rounding (and keeps the output in the valid range).
"""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from eglp_dist.device_constants import constant, to_device_async

Factor = Union[float, Tensor]

#: columns of the per-image uniforms drawn by :func:`sample_strong_params`
_U_JITTER, _U_BLUR, _U_BRIGHT, _U_CONTRAST, _U_SAT, _U_HUE = 0, 1, 2, 3, 4, 5
_U_ORDER = slice(6, 10)
_U_SIGMA = 10
_N_UNIFORMS = 11

#: op ids in ``order`` (kornia's numbering)
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


# -- colour adjustments on [0, 1] RGB (N, 3, H, W) -----------------------------------------
def _per_image(f: Factor, x: Tensor) -> Tensor:
    """A scalar or (N,) factor as an (N, 1, 1, 1) float tensor on ``x``'s device."""
    t = torch.as_tensor(f, dtype=x.dtype, device=x.device)
    return t.reshape(-1, 1, 1, 1) if t.dim() > 0 else t


def adjust_brightness(x: Tensor, delta: Factor) -> Tensor:
    """kornia 0.5.8 ``adjust_brightness(x, b - 1)``: ``clamp(x + delta, 0, 1)`` (additive)."""
    return (x + _per_image(delta, x)).clamp(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Factor) -> Tensor:
    """kornia 0.5.8 ``adjust_contrast``: ``clamp(x * factor, 0, 1)`` (no mean, OpenCV-style)."""
    return (x * _per_image(factor, x)).clamp(0.0, 1.0)


def adjust_saturation(x: Tensor, factor: Factor) -> Tensor:
    """Scale HSV saturation by ``factor`` (clamped to 1), keeping hue and value.

    Closed form of kornia's RGB -> HSV -> ``clamp(S * f, 0, 1)`` -> RGB (see module docstring):
    ``c' = V - (V - c) * min(f, V / delta)``; grey pixels (delta = 0) are unchanged.
    """
    f = _per_image(factor, x)
    v = x.amax(dim=1, keepdim=True)
    delta = v - x.amin(dim=1, keepdim=True)
    ratio = torch.minimum(f.expand_as(v), v / delta.clamp_min(1e-12))
    ratio = torch.where(delta > 0, ratio, torch.ones_like(ratio))
    return v - (v - x) * ratio


def rgb_to_hsv(x: Tensor) -> Tensor:
    """RGB in [0, 1] (N, 3, H, W) -> HSV with H in turns [0, 1), S, V in [0, 1].

    kornia's hexcone formulas (``kornia/color/hsv.py``) with H in turns instead of radians and
    ``S = delta / V`` exactly (kornia: ``delta / (V + 1e-6)``).
    """
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v, imax = x.max(dim=1)                      # first max on ties, as kornia
    delta = v - x.min(dim=1).values
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h_r = (g - b) / safe
    h_g = 2.0 + (b - r) / safe
    h_b = 4.0 + (r - g) / safe
    h = torch.where(imax == 0, h_r, torch.where(imax == 1, h_g, h_b))
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    h = torch.remainder(h / 6.0, 1.0)
    s = torch.where(v > 0, delta / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    return torch.stack([h, s, v], dim=1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """HSV (H in turns, any real value; S, V in [0, 1]) -> RGB; kornia's sector table."""
    h, s, v = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    h6 = torch.remainder(h, 1.0) * 6.0
    sector = torch.floor(h6)
    f = h6 - sector
    hi = torch.remainder(sector, 6.0).long()
    p = v * (1.0 - s)
    q = v * (1.0 - f * s)
    t = v * (1.0 - (1.0 - f) * s)
    # rows: R, G, B; columns: sectors 0..5
    table = torch.stack([
        torch.stack([v, q, p, p, t, v], dim=1),
        torch.stack([t, v, v, q, p, p], dim=1),
        torch.stack([p, p, t, v, v, q], dim=1),
    ], dim=1)                                                           # (N, 3, 6, H, W)
    idx = hi[:, None, None].expand(-1, 3, 1, -1, -1)
    return table.gather(2, idx).squeeze(2)


def adjust_hue(x: Tensor, shift: Factor) -> Tensor:
    """Rotate hue by ``shift`` turns (kornia: ``fmod(H + 2 pi * shift, 2 pi)``), via HSV."""
    hsv = rgb_to_hsv(x)
    sh = _per_image(shift, x)
    sh = sh[:, :, 0] if sh.dim() == 4 else sh                           # (N, 1, 1)
    h = torch.remainder(hsv[:, 0] + sh, 1.0)
    return hsv_to_rgb(torch.stack([h, hsv[:, 1], hsv[:, 2]], dim=1))


def color_jitter(x: Tensor, brightness: Factor, contrast: Factor, saturation: Factor, hue: Factor,
                 order: Sequence[int] = (BRIGHTNESS, CONTRAST, SATURATION, HUE)) -> Tensor:
    """kornia 0.5.8 ``ColorJitter.apply_transform`` with given factors and one op order.

    ``brightness`` is kornia's factor b (applied as ``+ (b - 1)``), ``hue`` is in turns.
    """
    for op in order:
        op = int(op)
        if op == BRIGHTNESS:
            x = adjust_brightness(x, torch.as_tensor(brightness, dtype=x.dtype, device=x.device) - 1.0)
        elif op == CONTRAST:
            x = adjust_contrast(x, contrast)
        elif op == SATURATION:
            x = adjust_saturation(x, saturation)
        elif op == HUE:
            x = adjust_hue(x, hue)
        else:
            raise ValueError(f"unknown colour-jitter op {op}")
    return x


# -- Gaussian blur --------------------------------------------------------------------------
def blur_kernel_size(n: int) -> int:
    """DAFormer: ``floor(ceil(0.1 * n) - 0.5 + ceil(0.1 * n) % 2)`` = ceil(0.1 n), made odd by -1.

    The product is taken in float64 as numpy does (``0.1 * 30`` rounds up to 3.0000000000000004,
    so 30 gives 3, as in DAFormer).
    """
    c = math.ceil(0.1 * n)
    return int(math.floor(c - 0.5 + c % 2))


def gaussian_kernel1d(size: int, sigma: Tensor) -> Tensor:
    """kornia's ``gaussian``: ``exp(-x^2 / (2 sigma^2))`` on ``x = arange(size) - size // 2``,
    normalised to sum 1; one row per sigma. ``sigma``: (N,) -> (N, size)."""
    x = torch.arange(size, dtype=sigma.dtype, device=sigma.device) - size // 2
    if size % 2 == 0:
        x = x + 0.5
    g = torch.exp(-x.pow(2)[None, :] / (2.0 * sigma[:, None] ** 2))
    return g / g.sum(dim=1, keepdim=True)


def gaussian_blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Blur each image with its own sigma: DAFormer's kernel sizes, reflect padding.

    Args:
        images: (N, C, H, W) float.
        sigma: (N,) standard deviations (same in x and y, as DAFormer).
    """
    n, c, h, w = images.shape
    x = images.to(torch.promote_types(images.dtype, torch.float32))
    sigma = to_device_async(sigma, x.device, x.dtype)
    ky, kx = blur_kernel_size(h), blur_kernel_size(w)
    if ky > 1:
        wy = gaussian_kernel1d(ky, sigma).repeat_interleave(c, dim=0)       # (N*C, ky)
        x = F.pad(x.reshape(1, n * c, h, w), (0, 0, ky // 2, ky // 2), mode="reflect")
        x = F.conv2d(x, wy[:, None, :, None], groups=n * c).reshape(n, c, h, w)
    if kx > 1:
        wx = gaussian_kernel1d(kx, sigma).repeat_interleave(c, dim=0)       # (N*C, kx)
        x = F.pad(x.reshape(1, n * c, h, w), (kx // 2, kx // 2, 0, 0), mode="reflect")
        x = F.conv2d(x, wx[:, None, None, :], groups=n * c).reshape(n, c, h, w)
    return x.to(images.dtype)


# -- sampling and applying ------------------------------------------------------------------
def sample_strong_params(batch: int, generator: torch.Generator, jitter_p: float = 0.8,
                         jitter_strength: float = 0.2, blur_p: float = 0.5,
                         blur_sigma: Tuple[float, float] = (0.15, 1.15)) -> Dict[str, Tensor]:
    """Draw every random quantity of :func:`strong_augment` for ``batch`` images (CPU tensors).

    Exactly ``batch * 11`` uniforms are drawn from ``generator`` in one call: apply-jitter,
    apply-blur, the four jitter factors, four keys whose argsort is the op order, sigma.
    """
    if generator is None:
        raise ValueError("strong augmentation needs an explicit torch.Generator")
    u = torch.rand((batch, _N_UNIFORMS), generator=generator, device=generator.device)
    u = u.to("cpu", torch.float64)
    s = float(jitter_strength)
    if s < 0:
        raise ValueError(f"jitter_strength must be >= 0, got {s}")

    def uniform(col: int, lo: float, hi: float) -> Tensor:
        return (lo + (hi - lo) * u[:, col]).float()

    lo_s, hi_s = float(blur_sigma[0]), float(blur_sigma[1])
    return {
        "jitter": u[:, _U_JITTER] < jitter_p,
        "blur": u[:, _U_BLUR] < blur_p,
        "brightness": uniform(_U_BRIGHT, max(0.0, 1.0 - s), min(2.0, 1.0 + s)),
        "contrast": uniform(_U_CONTRAST, max(0.0, 1.0 - s), 1.0 + s),
        "saturation": uniform(_U_SAT, max(0.0, 1.0 - s), 1.0 + s),
        "hue": uniform(_U_HUE, max(-0.5, -s), min(0.5, s)),
        "order": torch.argsort(u[:, _U_ORDER], dim=1),
        "sigma": uniform(_U_SIGMA, lo_s, hi_s),
    }


def _mean_std(mean: Sequence[float], std: Sequence[float], x: Tensor) -> Tuple[Tensor, Tensor]:
    return (constant(list(mean), x.device, x.dtype, (1, -1, 1, 1)),
            constant(list(std), x.device, x.dtype, (1, -1, 1, 1)))


def apply_strong_params(images: Tensor, mean: Sequence[float], std: Sequence[float],
                        params: Dict[str, Tensor]) -> Tensor:
    """Apply drawn parameters: jitter (where ``params['jitter']``), then blur (``params['blur']``)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    out = images.to(torch.promote_types(images.dtype, torch.float32), copy=True)
    m, s = _mean_std(mean, std, out)
    jit = params["jitter"].nonzero().flatten().tolist()
    if jit:
        idx = to_device_async(torch.tensor(jit), out.device)
        x01 = (out[idx] * s + m) / 255.0                                # DAFormer denorm
        dev = out.device
        rows = []
        for i, b in enumerate(jit):
            f = {k: to_device_async(params[k][b:b + 1], dev, out.dtype)
                 for k in ("brightness", "contrast", "saturation", "hue")}
            rows.append(color_jitter(x01[i:i + 1], f["brightness"], f["contrast"], f["saturation"],
                                     f["hue"], params["order"][b].tolist()))
        x01 = torch.cat(rows).clamp(0.0, 1.0)
        out[idx] = (x01 * 255.0 - m) / s                                # DAFormer renorm
    blur = params["blur"].nonzero().flatten().tolist()
    if blur:
        idx = to_device_async(torch.tensor(blur), out.device)
        out[idx] = gaussian_blur(out[idx], params["sigma"][blur])
    return out.to(images.dtype)


def strong_augment(images: Tensor, mean: Sequence[float], std: Sequence[float],
                   generator: torch.Generator, jitter_p: float = 0.8, jitter_strength: float = 0.2,
                   blur_p: float = 0.5, blur_sigma: Tuple[float, float] = (0.15, 1.15)) -> Tensor:
    """DAFormer's colour jitter + Gaussian blur, each image independently (labels untouched).

    Args:
        images: (B, 3, H, W) RGB normalised as ``(pixel - mean) / std`` with pixels in 0..255.
        mean, std: the normalisation (0..255 units), 3 values each.
        generator: the method's generator; 11 uniforms per image are drawn from it.
        jitter_p: probability of colour jitter per image (DAFormer: ``U > 0.2`` -> 0.8).
        jitter_strength: s for brightness, contrast, saturation and hue (DAFormer 0.2).
        blur_p: probability of Gaussian blur per image (DAFormer: ``U > 0.5`` -> 0.5).
        blur_sigma: sigma ~ U(blur_sigma) (DAFormer (0.15, 1.15)).

    Returns:
        A new tensor, same shape and dtype; images with neither op are bit-identical.
    """
    params = sample_strong_params(images.shape[0], generator, jitter_p, jitter_strength, blur_p,
                                  blur_sigma)
    return apply_strong_params(images, mean, std, params)
