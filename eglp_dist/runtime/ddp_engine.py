"""The DDP engine: torch DistributedDataParallel behind the ``Engine`` interface, one gradient
all-reduce per iteration (``BackwardSync``), no buffer broadcast per forward, one
``engine.pt`` per engine written by rank 0."""
from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any, Dict

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from eglp_dist.runtime import comm
from eglp_dist.runtime.backward_sync import BackwardSync
from eglp_dist.runtime.checkpoint import read_file
from eglp_dist.runtime.engine import Engine, MethodDispatcher, tensor_bytes

ENGINE_FILE = "engine.pt"  # DDP checkpoint of one engine

# DDP's reducer compares a gradient's strides with its bucket view's on *every* dimension.
# The backward of a depthwise conv (MiT's Mix-FFN, weights [C, 1, k, k]) returns a grad with
# strides [k*k, 1, k, 1] for the contiguous [k*k, k*k, k, 1] of the weight: they differ only
# on the size-1 dimension, where a stride addresses nothing, so both are the same memory
# layout and the copy into the bucket is the one DDP always makes. Exactly that case (sizes
# [N, 1, K, K]) is silenced; any other stride mismatch is a real layout difference and warns.
DEPTHWISE_STRIDE_WARNING = (r"(?s)Grad strides do not match bucket view strides.*"
                            r"grad\.sizes\(\) = \[\d+, 1, \d+, \d+\]")


def quiet_depthwise_stride_warning() -> None:
    """Install the filter (idempotent: ``warnings`` replaces an identical entry)."""
    warnings.filterwarnings("ignore", message=DEPTHWISE_STRIDE_WARNING, category=UserWarning)


# No buffer broadcast before every forward (DDP's default: one broadcast per forward and
# dtype, 4 per UDA step): training forwards use batch statistics, so rank 0's running
# statistics on the other ranks change nothing a step computes; sync_buffers() gives every
# rank rank 0's before each evaluation and checkpoint, as with DeepSpeed. torch 2.13 names
# the switch forward_sync_buffers (and deprecates broadcast_buffers); torch <= 2.12, the GPU
# hosts' 2.11 among them, knows only broadcast_buffers.
NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})


class DDPEngine(Engine):
    kind = "ddp"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.model.to(self.device)
        self.dispatcher = MethodDispatcher(self.model, self.device.type, self._amp_dtype)
        self.sync = BackwardSync()
        if self.env.world_size > 1:
            quiet_depthwise_stride_warning()
            self.wrapper: nn.Module = DistributedDataParallel(
                self.dispatcher,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                bucket_cap_mb=self.cfg.bucket_mb,
                find_unused_parameters=self.cfg.find_unused_parameters,
                **NO_FORWARD_BUFFER_SYNC)
        else:
            self.wrapper = self.dispatcher

    @property
    def _ddp(self) -> bool:
        return isinstance(self.wrapper, DistributedDataParallel)

    def _wrapped(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._ddp and torch.is_grad_enabled():
            # What DDP.no_sync() does, for all but the iteration's last gradient forward
            # (and for every forward of an accumulation-only iteration).
            synced = self.sync.forward_syncs(self.at_boundary)
            self.wrapper.require_backward_grad_sync = synced
            self.sync.forward(synced)
        return self.wrapper(method, *args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()
        self.sync.backward()

    def step(self) -> bool:
        if self._ddp and self.sync.end_iteration(self.at_boundary):
            comm.all_reduce_mean_([p.grad for p in self.model.parameters() if p.grad is not None])
        return super().step()

    def _optimizer_step(self) -> bool:
        # After DDP's all-reduce every rank holds the same gradients (a NaN on one rank is a
        # NaN in the sum), so this local test decides alike everywhere, with no collective.
        # One host read per optimizer step; DeepSpeed's overflow check costs the same.
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        finite = bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()) if grads else True
        if not finite:  # skip: no update, no lr step (as DeepSpeed skips an overflow step)
            self.optimizer.zero_grad(set_to_none=True)
            return False
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return True

    def save(self, path: Path) -> None:
        if self.env.rank == 0:  # replicated state: one writer
            path.mkdir(parents=True, exist_ok=True)
            torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "micro_steps": self.micro_steps,
                        "skipped_steps": self.skipped_steps,
                        # which backward syncs: part of the arithmetic (the sum's order)
                        "backward_sync_expected": self.sync.expected},
                       path / ENGINE_FILE)

    def load(self, path: Path) -> None:
        state = read_file(path / ENGINE_FILE, map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps = state["micro_steps"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.sync.expected = state.get("backward_sync_expected")

    def optimizer_state_bytes(self) -> Dict[str, int]:
        moments = tensor_bytes(t for s in self.optimizer.state.values() for t in s.values() if t.dim() > 0)
        return {"moments": moments, "master": 0}
