"""The DeepSpeed ZeRO-1/2 engine behind the ``Engine`` interface: DeepSpeed's own checkpoint
format (each rank its optimizer partition, elastic layout), re-partitioned on load for
another world size; the private ZeRO members it needs are behind ``zero_internals``."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List

import torch

from eglp_dist.errors import DataError
from eglp_dist.runtime import zero_internals
from eglp_dist.runtime.checkpoint import read_file
from eglp_dist.runtime.engine import Engine, MethodDispatcher, tensor_bytes

DS_TAG = "zero"  # DeepSpeed checkpoint tag (sub-folder) of one engine


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
        moments = tensor_bytes(t for s in inner.state.values() for t in s.values() if t.dim() > 0)
        master = tensor_bytes(getattr(zero_opt, "single_partition_of_fp32_groups", []))
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
