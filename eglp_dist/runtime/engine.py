"""One small interface over torch DDP and DeepSpeed ZeRO-1/2.

A process may hold several engines (EGLP trains the student and the NFNet, each with its
own optimizer); EMA teachers are plain modules beside them. Every engine:

* ``engine(x)`` / ``engine.call("forward_train", x)``: run any method of the model through the
  wrapper, so that DDP's and DeepSpeed's gradient hooks see it (both only hook ``forward``;
  a thin dispatcher module turns the method name into a forward call);
* ``engine.backward(loss)``: add d(loss)/d(params) — may be called several times per step
  (DACS calls it for the source and for the mixed loss);
* ``engine.step()``: once per iteration; the optimizer steps every ``grad_accum`` iterations,
  then the lr schedule advances;
* ``save(dir)`` / ``load(dir)`` / ``state_dict_fp32()``: checkpointing through the engine's
  own format (DeepSpeed's under ZeRO: each rank writes its optimizer partition).

Precision: ``runtime/precision.py``. The back-ends: ``runtime/ddp_engine.py`` and
``runtime/zero_engine.py``; which one a config builds, and reading either's checkpoint:
``runtime/engines.py``.
Gradient semantics are identical across engines: the loss is divided by ``grad_accum`` here
and DeepSpeed runs with ``managed_gradient_accumulation=false`` (our ``step()`` is the
accumulation boundary, several ``backward()`` per boundary allowed).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from eglp_dist.runtime import comm
from eglp_dist.runtime.env import DistEnv
from eglp_dist.runtime.precision import apply_matmul_precision, autocast, autocast_dtype


class MethodDispatcher(nn.Module):
    """Routes ``forward(method, *args)`` to ``model.method(*args)``, under the engine's autocast.

    Wrappers (DDP, DeepSpeed) only instrument ``forward``; this lets a segmentor expose
    ``forward_train``, ``encode`` etc. and still have every gradient-producing call go through
    the wrapper. Autocast is entered *here*, inside the wrapper: DeepSpeed's forward
    (``autocast_if_enabled``) turns an autocast entered outside it off unless its own
    ``torch_autocast`` is configured (which would also reduce gradients in bf16), so a context
    around the wrapper would make ZeRO train in fp32 while DDP trains in bf16."""

    def __init__(self, model: nn.Module, device_type: str, amp_dtype: Optional[torch.dtype]):
        super().__init__()
        self.model = model
        self.device_type, self.amp_dtype = device_type, amp_dtype

    def forward(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with autocast(self.device_type, self.amp_dtype):
            return getattr(self.model, method)(*args, **kwargs)


class Engine:
    """Common part: dispatch, autocast, accumulation counting, lr read-out."""

    kind = "base"

    def __init__(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, cfg, env: DistEnv, device: torch.device):
        self.name = name
        self.model = model  # the plain model: parameters, state_dict, EMA source
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.cfg = cfg
        self.env = env
        self.device = device
        self.grad_accum = int(cfg.grad_accum)
        self.micro_steps = 0  # completed calls of step()
        self.skipped_steps = 0  # optimizer steps skipped for non-finite gradients
        self.last_step_skipped = False
        self._amp_dtype = autocast_dtype(cfg.precision, device)
        apply_matmul_precision(cfg.precision)

    # -- forward -------------------------------------------------------------------
    def autocast(self):
        """The engine's precision for forwards outside the wrapper (EMA teacher, frozen copies)."""
        return autocast(self.device, self._amp_dtype)

    @property
    def at_boundary(self) -> bool:
        """Will the next step() update the weights?"""
        return (self.micro_steps + 1) % self.grad_accum == 0

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``model.method(*args)`` through the wrapper (autocast is entered inside it)."""
        return self._wrapped(method, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call("forward", *args, **kwargs)

    def _wrapped(self, method: str, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    # -- optimisation -------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> bool:
        """End of one iteration. Returns True when the weights were updated; False between
        accumulation boundaries and when the step was skipped for non-finite gradients
        (``last_step_skipped``, decided alike on every rank: see ``control.py``)."""
        boundary = self.at_boundary
        self.micro_steps += 1
        self.last_step_skipped = False
        if not boundary:
            return False
        updated = self._optimizer_step()
        if not updated:
            self.skipped_steps += 1
            self.last_step_skipped = True
        return updated

    def _optimizer_step(self) -> bool:
        raise NotImplementedError

    def lrs(self) -> List[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def train(self, mode: bool = True) -> "Engine":
        self.model.train(mode)
        return self

    def sync_buffers(self) -> None:
        """Rank 0's buffers (batch-norm running statistics) on every rank.

        Buffers are not gradients: each rank updates its own in every training forward.
        Neither engine syncs them during training (DDP runs without its forward buffer sync,
        DeepSpeed never broadcasts): training forwards use batch statistics, so another
        rank's running statistics change nothing a step computes, and a broadcast per
        forward would be 4 collectives per UDA step for nothing. What differs between ranks
        is each one's copy, so the loop calls this before every evaluation and checkpoint
        (mmseg's DistEvalHook does the same, ``broadcast_bn_buffer=True``): every rank
        evaluates, and the checkpoint holds, one model (rank 0's)."""
        comm.broadcast_tensors([b for b in self.model.buffers()], src=0)

    # -- state ---------------------------------------------------------------------
    def save(self, path: Path) -> None:
        raise NotImplementedError

    def load(self, path: Path) -> None:
        raise NotImplementedError

    def state_dict_fp32(self) -> Dict[str, torch.Tensor]:
        """Full fp32 weights of the model, identical on every rank (ZeRO-1/2 keep full
        parameters on each rank; only optimizer state and gradients are partitioned)."""
        return {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}

    def full_optimizer_state(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """Each parameter's whole optimizer state (moments), keyed like ``named_parameters``;
        a collective under ZeRO. For tests and checks that compare engines or world sizes."""
        return {name: {k: v.detach().cpu().clone() for k, v in self.optimizer.state[p].items()
                       if torch.is_tensor(v) and v.dim() > 0}
                for name, p in self.model.named_parameters() if p.requires_grad}

    def optimizer_state_bytes(self) -> Dict[str, int]:
        """Bytes this rank holds for the optimizer: `moments` (Adam's exp_avg/exp_avg_sq or
        SGD momentum) and `master` (fp32 master copies kept apart from the model's params)."""
        raise NotImplementedError


def tensor_bytes(tensors: Iterable[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
