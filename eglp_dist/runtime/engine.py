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

Precision: fp32 on CPU; on CUDA, bf16 autocast around the forward with fp32 parameters and
fp32 optimizer state in both engines, so DDP and ZeRO compute the same thing.
Gradient semantics are identical across engines: the loss is divided by ``grad_accum`` here
and DeepSpeed runs with ``managed_gradient_accumulation=false`` (our ``step()`` is the
accumulation boundary, several ``backward()`` per boundary allowed).
"""
from __future__ import annotations

import contextlib
import inspect
import os
import re
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Iterable, List, Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from eglp_dist.runtime import comm, zero_internals
from eglp_dist.runtime.checkpoint import read_file
from eglp_dist.runtime.env import DistEnv
from eglp_dist.errors import DataError
from eglp_dist.optim import build_optimizer, build_scheduler

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
DS_TAG = "zero"  # DeepSpeed checkpoint tag (sub-folder) of one engine


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def apply_matmul_precision(precision: str) -> None:
    """``tf32``: fp32 matmuls on TF32 tensor cores (Ampere and later; 10-bit mantissa inputs,
    fp32 accumulation), as cuDNN convolutions already are by torch's default. Every other
    setting keeps torch's default (full-precision matmuls), so ``fp32`` means what it says
    for MiT's Linear layers. Process-wide, like the flags it sets."""
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


def autocast(device: torch.device | str, dtype: Optional[torch.dtype]):
    """Autocast to ``dtype`` on ``device``'s type, or nothing when ``dtype`` is None (fp32);
    training engines and evaluation use the same context."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


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


def _tensor_bytes(tensors: Iterable[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


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
        moments = _tensor_bytes(t for s in self.optimizer.state.values() for t in s.values() if t.dim() > 0)
        return {"moments": moments, "master": 0}


class DeepSpeedEngine(Engine):
    kind = "zero"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        import deepspeed

        ds_config = deepspeed_config(self.cfg, self.env.world_size)
        self.model.to(self.device)
        self.dispatcher = MethodDispatcher(self.model, self.device.type, self._amp_dtype)
        # DeepSpeed puts the module on cuda:LOCAL_RANK unless told the device: with one GPU per
        # task (SLURM --gpus-per-task) that ordinal does not exist. Its accelerator follows our
        # device (env.align_deepspeed_accelerator, at process-group start).
        args = SimpleNamespace(device_rank=self.device.index if self.device.type == "cuda" else 0)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            args=args, model=self.dispatcher, optimizer=self.optimizer, lr_scheduler=self.scheduler,
            config=ds_config, dist_init_required=False)
        zero_internals.check(self.ds.optimizer, self.cfg.kind, deepspeed.__version__)

    def _wrapped(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.ds(method, *args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss / self.grad_accum, scale_wrt_gas=False)

    def _optimizer_step(self) -> bool:
        # reduce/finalise gradients, clip, optimizer step, zero grads, lr step; with fp32
        # master weights DeepSpeed skips the update (and the lr step) itself when the global
        # gradient norm, all-reduced, is not finite: the same decision on every rank.
        before = self.ds.skipped_steps
        self.ds.step()
        return self.ds.skipped_steps == before

    def lrs(self) -> List[float]:
        return [g["lr"] for g in self.ds.optimizer.param_groups]

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.ds.save_checkpoint(str(path), tag=DS_TAG, client_state={"micro_steps": self.micro_steps,
                                                                "skipped_steps": self.skipped_steps},
                                save_latest=False)

    def load(self, path: Path) -> None:
        files = zero_partition_files(path / DS_TAG)
        states = [read_file(f)["optimizer_state_dict"] for f in files]
        rigid = bool(states) and isinstance(states[0].get("base_optimizer_state"), dict)
        if rigid and len(files) != self.env.world_size:
            raise DataError(f"{files[0].parent}: ZeRO checkpoint written by {len(files)} rank(s) in DeepSpeed's "
                            f"rigid layout (by an eglp_dist before elastic checkpoints) cannot be re-partitioned "
                            f"for {self.env.world_size}; resume it on {len(files)} rank(s) once (its next "
                            f"checkpoint can move)")
        # Weights and lr schedule through DeepSpeed; the optimizer state below (elastic layout)
        # or, for an old rigid checkpoint on its own world size, by DeepSpeed too.
        _, client = self.ds.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=rigid,
                                            load_lr_scheduler_states=True)
        if client is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path / DS_TAG}")
        if not rigid:
            self._load_partitions(states)
        self.micro_steps = client["micro_steps"]
        self.skipped_steps = client.get("skipped_steps", 0)

    def _load_partitions(self, states: List[Dict[str, Any]]) -> None:
        """Load the optimizer state saved by ``len(states)`` ranks into this world's partitions,
        on the same world size or another.

        The module weights and lr schedule are loaded already (they are not partitioned), and
        DeepSpeed has refreshed the fp32 master partitions from them (exact: our parameters are
        fp32). Every rank has read all saved partitions (so, while loading, the full optimizer
        state sits in host memory); each group's flat moments are concatenated in rank order and
        this rank keeps its slice of the new partitioning (DeepSpeed's merge-and-slice helper,
        with this world's alignment); per-group scalars such as Adam's step count are equal on
        every saved rank and taken from the first. DeepSpeed's own elastic loader would do this
        but runs on an unchanged world size only, and asserts a group-level ``step`` that
        torch's AdamW does not keep. The result is the saved state, re-sliced, bit for bit
        (tested 2 -> 2, 2 -> 1 and 2 -> 3)."""
        zero_opt = self.ds.optimizer
        inner = zero_opt.optimizer
        zero_internals.load_global_state(zero_opt, states[0])
        for i, group in enumerate(inner.param_groups):
            flat = group["params"][0]  # this rank's fp32 partition of group i
            saved = [sd["base_optimizer_state"][i] for sd in states]
            for key in saved[0]:
                values = [g[key] for g in saved]
                partitioned = all(torch.is_tensor(v) and v.shape == sd["single_partition_of_fp32_groups"][i].shape
                                  for v, sd in zip(values, states))
                if partitioned:  # one copy that owns its memory (a slice would keep the merged buffer)
                    value = zero_internals.partition_state(zero_opt, key, values, i).to(
                        flat.device, flat.dtype, copy=True)
                else:
                    value = values[0].clone() if torch.is_tensor(values[0]) else values[0]
                inner.state[flat][key] = value
        # The groups' lr is optimizer state too (the same-world loader restores it with the
        # rest); here it comes from the loaded schedule, or the first step would use lr(0).
        for group, lr in zip(inner.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        zero_internals.relink_fragments(zero_opt)

    def full_optimizer_state(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """Collective: gathered from the partitions (DeepSpeed's tensor-fragment API)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        zero_internals.relink_fragments(self.ds.optimizer)
        inner = self.ds.optimizer.optimizer
        keys = sorted({k for s in inner.state.values() for k, v in s.items() if torch.is_tensor(v) and v.dim() > 0})
        return {name: {k: safe_get_full_optimizer_state(p, k).detach().cpu().clone() for k in keys}
                for name, p in self.model.named_parameters() if p.requires_grad}

    def optimizer_state_bytes(self) -> Dict[str, int]:
        zero_opt = self.ds.optimizer  # DeepSpeedZeroOptimizer wrapping the torch optimizer
        inner = zero_opt.optimizer
        moments = _tensor_bytes(t for s in inner.state.values() for t in s.values() if t.dim() > 0)
        master = _tensor_bytes(getattr(zero_opt, "single_partition_of_fp32_groups", []))
        return {"moments": moments, "master": master}


def deepspeed_config(engine_cfg, world_size: int) -> Dict[str, Any]:
    """The DeepSpeed config of a ZeRO-1/2 engine: fp32 parameters and optimizer state (no
    DeepSpeed bf16/fp16 mode; autocast is ours), our own accumulation boundary."""
    stage = {"zero1": 1, "zero2": 2}[engine_cfg.kind]
    # DeepSpeed counts its buckets in elements; DDP's bucket_cap_mb is MiB. Gradients are fp32.
    bucket = int(engine_cfg.bucket_mb * 2 ** 20) // 4
    return {
        # Batches come from our own loaders; DeepSpeed only needs a consistent triple.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": int(engine_cfg.grad_accum),
        "train_batch_size": int(engine_cfg.grad_accum) * world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(engine_cfg.grad_clip or 0.0),
        "zero_optimization": {
            "stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
            "overlap_comm": bool(engine_cfg.overlap_comm), "contiguous_gradients": True,
            # Each rank saves its partition of the optimizer state without the alignment
            # padding, per group: the layout that can be re-sliced for another number of
            # ranks (see DeepSpeedEngine.load). Training is unchanged.
            "elastic_checkpoint": True,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
    }


def zero_partition_files(tag_dir: Path) -> List[Path]:
    """The optimizer partitions of a DeepSpeed ZeRO-1/2 checkpoint, in rank order."""
    found = [(int(m.group(1)), f) for f in tag_dir.glob("*zero_pp_rank_*_optim_states.pt")
             if (m := re.search(r"zero_pp_rank_(\d+)_", f.name))]
    return [f for _, f in sorted(found)]


def build_engine(name: str, model: nn.Module, param_groups: Iterable[Dict[str, Any]], optim_cfg,
                 schedule_cfg, max_iters: int, engine_cfg, env: DistEnv, device: torch.device) -> Engine:
    """The model must be built identically on every rank (same seed); both engines then
    start from the same weights (DDP broadcasts rank 0's, DeepSpeed too)."""
    optimizer = build_optimizer(param_groups, optim_cfg)
    scheduler = build_scheduler(optimizer, max_iters, schedule_cfg)
    cls = DDPEngine if engine_cfg.kind == "ddp" else DeepSpeedEngine
    return cls(name, model, optimizer, scheduler, engine_cfg, env, device)


def export_fp32(engine_dir: os.PathLike | str) -> Dict[str, torch.Tensor]:
    """A plain fp32 state_dict of the model from one engine's checkpoint folder, whichever
    engine wrote it, without starting any process group."""
    engine_dir = Path(engine_dir)
    if (engine_dir / ENGINE_FILE).is_file():
        state = read_file(engine_dir / ENGINE_FILE)["model"]
    elif (engine_dir / DS_TAG).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        full = get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag=DS_TAG)
        prefix = "model."  # the MethodDispatcher's attribute
        state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    else:
        raise FileNotFoundError(f"{engine_dir}: neither {ENGINE_FILE} (DDP) nor {DS_TAG}/ (DeepSpeed) found")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
