"""Class-wise day/night similarity scores: which classes look least alike in a source (day)
image and its target (night) partner. PIG ranks classes by them; EGLP's DNIS builds on the
same class statistics.

Two scores, both "larger = less similar", one per (image, class), 0 for a class absent from
the source image:

* ``stats`` (ours, no weights): per class, the mean and standard deviation of four pixel
  features (log-intensity R, G, B and their Sobel gradient magnitude) over the
  source pixels of that class (ground truth) and over the target pixels the UDA teacher
  labels with it (the whole target image where it labels none); the score is the L1 distance
  of the two (mean, std) vectors. It is built from sums (count, sum, sum of squares per
  class), so it can be reduced across ranks and smoothed over steps (DNIS).
* ``lpips`` (PIG's, ``mmseg/uda/dacs.py`` 300-337 of qiurui4shu/PIG): LPIPS with AlexNet
  between the source image with every pixel outside the class zeroed and the whole target
  image, for each class present anywhere in the batch's source labels. As in PIG, the images
  go in as they are (ImageNet-normalised, not the [-1, 1] LPIPS documents) and the zeroing is
  done on the normalised image (a zero there is the mean colour). Kept in eval mode (PIG
  leaves LPIPS in train mode, so its dropout makes the scores random). The AlexNet features
  are read from a local file; LPIPS's linear layers ship inside the ``lpips`` package;
  nothing is downloaded.

How they relate: both compare "how class c looks in the day image" with "how the night image
looks"; LPIPS does it with deep features over the whole (mostly blank) masked image, so the
class's area weighs in; ``stats`` compares the class's own pixels with the night pixels of the
same class, so it measures appearance change per class directly and costs next to nothing.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from eglp_dist.device_constants import constant
from eglp_dist.errors import ConfigError, DataError

IGNORE = 255
NUM_FEATURES = 4


def pixel_features(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(B, 3, H, W) normalised images -> (B, 4, H, W): log-intensity R, G, B in [0, 1]
    (log(1 + v) / log(256)) and the Sobel gradient magnitude of their mean.

    Why log: night changes the illumination, which multiplies pixel values; in log space a
    class darkened by a factor moves by the same amount whatever its own brightness, so a
    dark pole and a bright sky halved in light score alike (on the synthetic night, whose
    classes are darkened by known factors, log features rank classes by their factor with
    Spearman 0.61 against 0.36 for linear RGB; see tests/test_eglp.py)."""
    m = constant(list(mean), images.device, torch.float32, (1, 3, 1, 1))
    s = constant(list(std), images.device, torch.float32, (1, 3, 1, 1))
    rgb = torch.log1p((images.float() * s + m).clamp(0, 255)) / math.log(256.0)
    grey = rgb.mean(1, keepdim=True)
    sobel = [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]
    k = constant([sobel, [list(r) for r in zip(*sobel)]], images.device, torch.float32, (2, 1, 3, 3)) / 8
    g = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), k)
    return torch.cat([rgb, g.pow(2).sum(1, keepdim=True).sqrt()], 1)


def class_bins(labels: Tensor, num_classes: int, offset: int = 0, dropped: Optional[int] = None) -> Tensor:
    """(...) labels -> flat bin indices ``offset + label``; every label outside [0, K) (255)
    goes to the bin ``dropped`` (default ``offset + K``, the one past them), which the caller
    drops."""
    lab = labels.reshape(-1).long()
    spare = offset + num_classes if dropped is None else dropped
    return torch.where((lab >= 0) & (lab < num_classes), lab + offset, torch.full_like(lab, spare))


def binned_sums(features: Tensor, bins: Tensor, num_bins: int) -> Tensor:
    """(N, C) pixel features and (N,) bin indices -> (num_bins, 1 + 2C) float64 sums [count,
    sum of each feature, sum of squares of each feature]: a statistic that adds up over pixels,
    images and ranks. float64 because the moments subtract ``mean**2`` from ``E[x**2]``; the
    three blocks are scattered one by one, without an (N, 1 + 2C) float64 temporary (which
    cost 5x the scatter itself)."""
    c = features.shape[1]
    f = features.double()
    out = torch.zeros(num_bins, 1 + 2 * c, dtype=torch.float64, device=features.device)
    out[:, 0].index_add_(0, bins, torch.ones_like(f[:, 0]))  # not bincount: it syncs on a GPU to size its output
    out[:, 1:1 + c].index_add_(0, bins, f)
    out[:, 1 + c:].index_add_(0, bins, f.square_())
    return out


def flat_pixels(features: Tensor) -> Tensor:
    """(B, C, H, W) -> (B * H * W, C), pixels in the order of ``labels.reshape(-1)``."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def class_sums(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Per image and class, (B, C, H, W) features and (B, H, W) labels (255 ignored) ->
    (B, K, 1 + 2C) float64 ``binned_sums``, in one scatter for the whole batch."""
    b, hw = features.shape[0], features[0, 0].numel()
    per_image = torch.arange(b, device=features.device).repeat_interleave(hw) * (num_classes + 1)
    sums = binned_sums(flat_pixels(features), class_bins(labels, num_classes) + per_image, b * (num_classes + 1))
    return sums.view(b, num_classes + 1, -1)[:, :num_classes]


def moments(sums: Tensor) -> tuple:
    """(..., 1 + 2C) sums -> (count, mean, std) with count clamped to 1 where it is 0."""
    c = (sums.shape[-1] - 1) // 2
    n = sums[..., :1]
    safe = n.clamp(min=1)
    mean = sums[..., 1:1 + c] / safe
    var = (sums[..., 1 + c:] / safe - mean * mean).clamp(min=0)
    return n[..., 0], mean, var.sqrt()


def stats_distance(src_sums: Tensor, tgt_sums: Tensor) -> Tensor:
    """L1 distance of (mean, std) vectors, last dimension reduced."""
    _, ms, ss = moments(src_sums)
    _, mt, st = moments(tgt_sums)
    return ((ms - mt).abs() + (ss - st).abs()).sum(-1)


class StatsSimilarity:
    """The weight-free ``stats`` score (see the module docstring)."""

    def __init__(self, mean, std, num_classes: int):
        self.mean, self.std, self.k = list(mean), list(std), num_classes

    @torch.no_grad()
    def __call__(self, src_img: Tensor, src_seg: Tensor, tgt_img: Tensor, tgt_label: Tensor) -> Tensor:
        src = class_sums(pixel_features(src_img, self.mean, self.std), src_seg, self.k)
        tgt_f = pixel_features(tgt_img, self.mean, self.std)
        tgt = class_sums(tgt_f, tgt_label, self.k)
        whole = class_sums(tgt_f, torch.zeros_like(tgt_label), 1)  # every target pixel
        tgt = torch.where(tgt[..., :1] > 0, tgt, whole.expand_as(tgt))
        score = stats_distance(src, tgt).float()
        return torch.where(src[..., 0] > 0, score, torch.zeros_like(score))


class LpipsSimilarity:
    """PIG's score: LPIPS(AlexNet)(source with all but class c zeroed, target), per image and
    for each class present anywhere in the batch's source labels; 0 for the other classes."""

    def __init__(self, alexnet_path: Optional[str], num_classes: int, device):
        if not alexnet_path:
            raise ConfigError("method.fusion.lpips_alexnet: similarity=lpips needs the path of a "
                              "torchvision AlexNet state_dict (e.g. alexnet-owt-7be5be79.pth); "
                              "nothing is downloaded")
        import os

        if not os.path.isfile(alexnet_path):
            raise DataError(f"{alexnet_path}: AlexNet weight file not found (method.fusion.lpips_alexnet)")
        import lpips

        from eglp_dist.weights import read_weight_file

        self.net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
        state = read_weight_file(alexnet_path)  # tensor-only load, container unwrapped, errors named
        for slice_ in (self.net.net.slice1, self.net.net.slice2, self.net.net.slice3,
                       self.net.net.slice4, self.net.net.slice5):
            for idx, layer in slice_.named_children():
                if isinstance(layer, torch.nn.Conv2d):
                    try:
                        layer.weight.data.copy_(state[f"features.{idx}.weight"])
                        layer.bias.data.copy_(state[f"features.{idx}.bias"])
                    except KeyError as exc:
                        raise DataError(f"{alexnet_path}: not a torchvision AlexNet state_dict "
                                        f"(no {exc.args[0]})") from None
        self.net = self.net.to(device).eval().requires_grad_(False)
        self.k = num_classes

    @torch.no_grad()
    def __call__(self, src_img: Tensor, src_seg: Tensor, tgt_img: Tensor, tgt_label: Tensor) -> Tensor:
        b = src_img.shape[0]
        present = torch.zeros(self.k, dtype=torch.bool, device=src_seg.device)
        valid = src_seg[(src_seg >= 0) & (src_seg < self.k)]
        present[valid.unique()] = True
        src, tgt = src_img.float(), tgt_img.float()  # normalised, as PIG feeds them
        scores = torch.zeros(b, self.k, device=src_img.device)
        for c in present.nonzero().flatten().tolist():  # the classes of the batch (PIG's loop)
            masked = src * (src_seg == c).unsqueeze(1)
            scores[:, c] = self.net(masked, tgt).flatten()
        return scores


def build_similarity(fusion_cfg, mean, std, num_classes: int, device) -> Callable[..., Tensor]:
    if fusion_cfg.similarity == "lpips":
        return LpipsSimilarity(fusion_cfg.lpips_alexnet, num_classes, device)
    return StatsSimilarity(mean, std, num_classes)
