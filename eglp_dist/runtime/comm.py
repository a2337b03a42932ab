"""The named collectives the rest of the code may use (DESIGN: nothing else calls
torch.distributed). They work under DDP and DeepSpeed alike because both share torch's default
process group, and degrade to no-ops in a single process without one.

Statistics are reduced as sums (never averages) so that N ranks give the same answer as one
rank over the same samples.
"""
from __future__ import annotations

from typing import Any, Callable, List

import torch
import torch.distributed as tdist


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def backend() -> str:
    """The process group's backend (gloo, nccl), or 'none' in a single process."""
    return str(tdist.get_backend()) if is_distributed() else "none"


def backend_device() -> torch.device:
    """Where the backend reduces: this rank's GPU under NCCL, the CPU under gloo."""
    if backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    """In place, whatever device ``tensor`` is on: NCCL reduces CUDA tensors only, so a host
    tensor (a counter, a flag, a log value) goes through the GPU and back; every caller can
    hand over what it holds, on gloo and NCCL alike."""
    if not (is_distributed() and world_size() > 1):
        return tensor
    device = backend_device()
    work = tensor if tensor.device == device else tensor.to(device)
    tdist.all_reduce(work, op=op)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place SUM across ranks; returns the tensor. Integer tensors stay exact."""
    return _reduce(tensor, tdist.ReduceOp.SUM)


class PendingSums:
    """Tensors packed into one float64 message whose SUM across ranks is under way; ``wait()``
    hands each back reduced, in its own shape (on the backend's device). One collective for
    any number of parts, started as soon as the sums exist and waited for where they are
    needed, so the work in between (a teacher's forward) hides the wait for the other ranks.
    float64 keeps pixel counts exact beyond 2**24. Without a process group: the local sums."""

    def __init__(self, tensors: List[torch.Tensor]):
        self.shapes = [t.shape for t in tensors]
        device = backend_device()
        self.flat = (torch.cat([t.reshape(-1).to(device, torch.float64) for t in tensors]) if tensors
                     else torch.zeros(0, dtype=torch.float64, device=device))
        self.work = None
        if self.flat.numel() and is_distributed() and world_size() > 1:
            self.work = tdist.all_reduce(self.flat, op=tdist.ReduceOp.SUM, async_op=True)

    def wait(self) -> List[torch.Tensor]:
        if self.work is not None:
            self.work.wait()  # NCCL: the compute stream waits, the host does not
            self.work = None
        out, offset = [], 0
        for shape in self.shapes:
            n = shape.numel()
            out.append(self.flat[offset:offset + n].view(shape))
            offset += n
        return out


def reduce_sums(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """The SUM of each tensor across ranks, all in one collective (float64)."""
    return PendingSums(list(tensors)).wait()


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    return _reduce(tensor, tdist.ReduceOp.MAX)


def _flat_per_dtype(tensors: List[torch.Tensor], collective: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Run ``collective`` (in place, on the backend's device) on one flat message per dtype
    of ``tensors`` and write the results back into them (as DDP coalesces its buckets)."""
    if not tensors or not (is_distributed() and world_size() > 1):
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for dtype in sorted({t.dtype for t in tensors}, key=str):
        group = [t for t in tensors if t.dtype == dtype]
        flat = collective(_flatten_dense_tensors([t.detach() for t in group]).to(backend_device()))
        for t, value in zip(group, _unflatten_dense_tensors(flat, group)):
            t.data.copy_(value)


def all_reduce_mean_(tensors: List[torch.Tensor]) -> None:
    """Average ``tensors`` across ranks in place (gradients that DDP's reducer did not
    average: see ``engine.BackwardSync``)."""
    _flat_per_dtype(tensors, lambda flat: _reduce(flat, tdist.ReduceOp.SUM).div_(world_size()))


def broadcast_tensors(tensors: List[torch.Tensor], src: int = 0) -> None:
    """Rank ``src``'s values into ``tensors`` on every rank, in place."""
    def broadcast(flat: torch.Tensor) -> torch.Tensor:
        tdist.broadcast(flat, src=src)
        return flat

    _flat_per_dtype(tensors, broadcast)


def barrier() -> None:
    if is_distributed() and world_size() > 1:
        tdist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s Python object on every rank (small things: paths, decisions)."""
    if not (is_distributed() and world_size() > 1):
        return obj
    box: List[Any] = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> List[Any]:
    if not (is_distributed() and world_size() > 1):
        return [obj]
    out: List[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def set_timeout(seconds: float) -> None:
    """The collective timeout of the default group from now on (start-up may take longer than
    a step: the loop shortens it while training and lengthens it for checkpoints)."""
    if is_distributed():
        from datetime import timedelta

        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(timedelta(seconds=float(seconds)))
