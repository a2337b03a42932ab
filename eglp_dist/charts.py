"""Pictures of results a person would rather look at than a table: per-class IoU of several
methods side by side (``eglp demo``, ``tools/ablate.py``), as a PNG and as an image array for
TensorBoard. matplotlib with its non-interactive Agg back-end: no display needed."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np


def class_iou_chart(ious: Mapping[str, Mapping[str, Optional[float]]], classes: Sequence[str],
                    path: Path, title: str = "", note: Sequence[float] = ()) -> np.ndarray:
    """Grouped bars: one group per class (in the order given), one bar per method (IoU in
    %); ``note``: a number per class printed under its name (e.g. the designed night change).
    Writes ``path`` (PNG, atomically) and returns the picture as HWC uint8."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eglp_dist.atomic import atomic_path

    methods = list(ious)
    x = np.arange(len(classes))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.6 * len(classes)), 4.5), dpi=110)
    for i, m in enumerate(methods):
        vals = [100 * (ious[m].get(c) if ious[m].get(c) is not None else np.nan) for c in classes]
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, vals, width, label=m)
    labels = [f"{c}\n{v:.2f}" for c, v in zip(classes, note)] if len(note) == len(classes) else list(classes)
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, ncols=min(len(methods), 4))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.canvas.draw()
    picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return picture
