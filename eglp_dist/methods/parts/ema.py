"""EMA teacher (mean teacher of DACS/DAFormer/HRDA).

The teacher is a plain module beside the engines, never wrapped: it gets no gradients. Its
batch norms run in training mode as in DAFormer (only dropout and drop-path are switched
off), so their running statistics drift apart per rank; ``sync_buffers`` (called with the
students') gives every rank rank 0's before evaluation and checkpoint. It tracks the *unwrapped* student (``engine.model``), whose
parameters are full and identical on every rank under DDP and under ZeRO-1/2 (those stages
partition optimizer state and gradients, not parameters), so every rank's teacher is the same.

Update rule (DAFormer ``_update_ema``): ``alpha_t = min(1 - 1/(t + 1), alpha)``, parameters
only (buffers keep the values they were copied with), done with ``torch._foreach_*`` so it is
one multi-tensor kernel rather than a Python loop over hundreds of tensors.
"""
from __future__ import annotations

import copy
from typing import Dict

import torch
import torch.nn as nn

_STOCHASTIC = (nn.modules.dropout._DropoutNd,)


def ema_alpha(step: int, alpha_max: float) -> float:
    return min(1.0 - 1.0 / (step + 1), alpha_max)


class EMATeacher:
    run_wide = True  # tracks the replicated student: identical on every rank, saved once

    def __init__(self, student: nn.Module, alpha: float = 0.999):
        self.alpha = alpha
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)
        self.pseudo_label_mode()

    def pseudo_label_mode(self) -> nn.Module:
        """DAFormer's teacher mode: dropout and drop-path off, every other module (batch
        norm) in training mode, as ``dacs.py`` sets it before each pseudo-label forward.
        Called before every use, so a ``train()``/``eval()`` elsewhere cannot leave it wrong."""
        self.module.train()
        for m in self.module.modules():
            if isinstance(m, _STOCHASTIC) or type(m).__name__ == "DropPath":
                m.eval()
        return self.module

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> float:
        """Move the teacher towards `student`; returns the alpha used."""
        alpha = ema_alpha(step, self.alpha)
        teacher_params = [p for p in self.module.parameters()]
        student_params = [p.detach().to(dtype=t.dtype) for p, t in zip(student.parameters(), teacher_params)]
        if len(teacher_params) != len(list(student.parameters())):
            raise RuntimeError("EMA teacher and student have different parameter lists")
        torch._foreach_mul_(teacher_params, alpha)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - alpha)
        return alpha

    def sync_buffers(self) -> None:
        """Rank 0's buffers on every rank. The teacher's batch norms run in training mode (as
        DAFormer's), so each rank's running statistics follow its own target batches; the
        loop calls this where it syncs the students' (before evaluation and checkpoint), so
        the checkpoint's "identical on every rank" holds for a BN network too."""
        from eglp_dist.runtime import comm

        comm.broadcast_tensors(list(self.module.buffers()), src=0)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
