"""Sliding-window inference: windows over an image, one function per window, averaged.

Used twice with the same code: HRDA slides detail windows (512, stride 256) over the
high-resolution image and stitches their stride-4 logits; every model can slide test windows
(HRDA: 1024, stride 512) over a whole image and stitch full-resolution logits. Window
placement is mmseg's: a regular grid, the last window pushed back inside the image.
"""
from __future__ import annotations

import math
from typing import Callable, List, Sequence, Tuple

import torch

Box = Tuple[int, int, int, int]  # (y1, y2, x1, x2), HRDA's order


def window_boxes(height: int, width: int, window: Sequence[int], stride: Sequence[int]) -> List[Box]:
    """mmseg/HRDA slide grid: windows of ``window`` every ``stride``, clipped into the image."""
    wh, ww = window
    sh, sw = stride
    rows = max(height - wh + sh - 1, 0) // sh + 1
    cols = max(width - ww + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + wh, height), min(c * sw + ww, width)
            boxes.append((max(y2 - wh, 0), y2, max(x2 - ww, 0), x2))
    return boxes


def slide(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, window: Sequence[int],
          stride: Sequence[int], out_stride: int = 1, batched: bool = True) -> torch.Tensor:
    """Run ``fn`` on every window of ``images`` and average the outputs where windows overlap.

    ``fn`` maps a (N, C, h, w) batch of windows to (N, K, ceil(h / out_stride), ...). The
    result is (B, K, ceil(H / out_stride), ceil(W / out_stride)). With ``out_stride > 1``
    windows are placed at ``y1 // out_stride``, exact when offsets are multiples of it (the
    HRDA detail grid is: crops and strides are multiples of 8).
    """
    b, _, height, width = images.shape
    boxes = window_boxes(height, width, window, stride)
    crops = [images[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes]
    if batched:
        outs = fn(torch.cat(crops, dim=0)).split(b, dim=0)
    else:
        outs = [fn(c) for c in crops]
    if len(boxes) == 1:
        return outs[0]
    oh, ow = math.ceil(height / out_stride), math.ceil(width / out_stride)
    total = outs[0].new_zeros((b, outs[0].shape[1], oh, ow))
    count = outs[0].new_zeros((1, 1, oh, ow))
    for (y1, _, x1, _), out in zip(boxes, outs):
        oy, ox = y1 // out_stride, x1 // out_stride
        h, w = min(out.shape[-2], oh - oy), min(out.shape[-1], ow - ox)
        total[:, :, oy:oy + h, ox:ox + w] += out[:, :, :h, :w]
        count[:, :, oy:oy + h, ox:ox + w] += 1
    return total / count
