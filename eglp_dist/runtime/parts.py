"""What a method part is, for the loop and the checkpoint: how it is saved, and, if it learns
from statistics of every rank, how they are reduced.

* **Saved by its type.** A part (an EMA teacher, DNIS, RCM's bank) is
  :class:`~eglp_dist.runtime.checkpoint.Stateful` and says with ``run_wide`` what it is:
  ``True`` for state identical on every rank (built from reduced statistics, or from the
  replicated student): saved once by rank 0 and loaded by every rank, including a rank the
  checkpoint did not have; ``False`` for state of this rank's own data (RCM's memory bank):
  saved per rank, and empty on a rank the checkpoint did not have. The method registers a
  part once (``Method.add_part``); nothing else decides where it goes.
* **Local sums out, reduced sums in.** A part with cross-rank statistics computes this
  rank's sums for the step (its own method, any name, a float tensor of a fixed shape on
  every rank, zeros where the rank has no data) and takes the SUM over ranks with
  ``absorb(reduced)``. :func:`start_reduction` packs every part's sums of a step into the
  step's **one** collective and, on ``finish()``, hands each part its slice, so a recipe with
  two such parts (EGLP's DNIS and RCM confidences) or ten still makes one call, and a part
  never knows the layout of the message.
"""
from __future__ import annotations

from typing import List, Protocol, Sequence, Tuple

from torch import Tensor

from eglp_dist.runtime import comm


class ReducedStatistics(Protocol):
    run_wide: bool  # True: every rank absorbs the same sums, so every rank holds the same state

    def absorb(self, reduced: Tensor) -> None:
        """Fold this step's sums over all ranks (same shape as the local sums) into the state."""


def is_run_wide(part, name: str) -> bool:
    value = getattr(part, "run_wide", None)
    if not isinstance(value, bool):
        raise TypeError(f"method part {name!r} ({type(part).__name__}) must say run_wide = True (identical "
                        f"on every rank: saved once) or False (per-rank state: saved per rank)")
    return value


class PendingStatistics:
    """One step's sums of several parts, their SUM across ranks under way."""

    def __init__(self, contributions: Sequence[Tuple[ReducedStatistics, Tensor]]):
        self.parts: List[ReducedStatistics] = [part for part, _ in contributions]
        self.pending = comm.PendingSums([sums for _, sums in contributions])

    def finish(self) -> None:
        """Wait for the collective and hand every part its reduced sums."""
        for part, reduced in zip(self.parts, self.pending.wait()):
            part.absorb(reduced)
        self.parts = []


def start_reduction(contributions: Sequence[Tuple[ReducedStatistics, Tensor]]) -> PendingStatistics:
    """Start the one collective of ``(part, local sums)`` pairs; ``finish()`` where needed."""
    return PendingStatistics(contributions)
