"""Messages a user should read once: printed by one process, plainly.

``warnings.warn`` from every rank prints the same text N times with a source line under it;
a run-level observation (a setting that has no effect, a part that runs reduced) or warning
(a damaged checkpoint passed over) is said once, by the launch's rank 0, as one line on
stderr. Before the process group exists the rank comes from the launcher's environment
(torchrun's RANK, SLURM's SLURM_PROCID).
"""
from __future__ import annotations

import os
import sys


def launch_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def notice(text: str, kind: str = "note") -> None:
    """``eglp: note: TEXT`` on stderr, from rank 0 only."""
    if launch_rank() == 0:
        print(f"eglp: {kind}: {text}", file=sys.stderr, flush=True)


def warning(text: str) -> None:
    """``eglp: warning: TEXT``: something the user may have to act on (a damaged checkpoint
    passed over, a resumed stream that differs), said once."""
    notice(text, kind="warning")
