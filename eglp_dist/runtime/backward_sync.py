"""Which of an iteration's gradient forwards gets DDP's all-reduce (``runtime/ddp_engine.py``)."""
from __future__ import annotations

from typing import Optional


class BackwardSync:
    """Which gradient forward of an iteration gets DDP's all-reduce.

    DDP reduces the gradients at every backward whose forward ran with sync on: DACS' source,
    mixed and masked backwards would each all-reduce the whole model (3 x ~0.36 GB for
    MiT-b5). One reduction per iteration is enough: backwards of forwards run without sync
    only accumulate (``no_sync``), and the last one, synced, reduces the sum. The methods'
    iterations are fixed sequences of forward -> backward pairs, so the number of gradient
    forwards is learned from the previous iteration (the first one syncs every backward, as
    plain DDP) and only the last of them syncs. An iteration that breaks the pattern (more or
    fewer forwards, or a forward before the previous one's backward) ends with an explicit
    all-reduce of the accumulated gradients instead: correct whatever the order (the synced
    part is equal on every rank, so averaging it again changes nothing), only slower; then
    the pattern is learned again. Every rank runs the same forwards, so every rank decides
    alike without talking."""

    def __init__(self):
        self.expected: Optional[int] = None  # gradient forwards per iteration, once learned
        self._reset()

    def _reset(self) -> None:
        self.forwards = self.backwards = 0
        self.last_synced = False
        self.in_order = True

    def forward_syncs(self, boundary: bool) -> bool:
        """Should the gradient forward about to run sync its backward?"""
        if not boundary:  # accumulation iteration: nothing reduces
            return False
        return self.expected is None or self.forwards == self.expected - 1

    def forward(self, synced: bool) -> None:
        if self.backwards != self.forwards:
            self.in_order = False
        self.forwards += 1
        self.last_synced = synced

    def backward(self) -> None:
        self.backwards += 1

    def end_iteration(self, boundary: bool) -> bool:
        """True when this iteration's gradients still need an explicit all-reduce."""
        clean = self.in_order and self.backwards == self.forwards
        explicit = boundary and self.forwards > 0 and not (clean and self.last_synced)
        self.expected = self.forwards if clean else None
        self._reset()
        return explicit
