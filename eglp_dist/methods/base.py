"""What the training loop knows about a recipe.

A ``Method`` owns everything that learns or draws random numbers:

* ``engines``: optimised models (DDP or DeepSpeed), checkpointed in their own format;
* parts: what changes during training beside them (EMA teachers, DNIS, RCM), each
  :class:`~eglp_dist.runtime.checkpoint.Stateful` and registered with ``add_part``; its type
  says where it is saved (``runtime.parts``): ``modules`` hold the run-wide ones (identical on
  every rank, checkpointed once from rank 0), ``rank_parts`` the per-rank ones (saved by
  every rank in ``state_dict``);
* ``generator``: the one ``torch.Generator`` behind every random choice the recipe makes
  (ClassMix classes, jitter, blur, HRDA detail boxes, MIC masks), seeded per rank and saved
  per rank, so a resumed run draws exactly what the uninterrupted one would have drawn.

The loop gives ``step(batches, it)`` one batch per stream named in ``streams`` and gets back
detached scalar tensors to log; ``visuals()`` returns the last step's pictures for TensorBoard.
EGLP's NFNet is a second engine in the same process; nothing here assumes only one.

Every recipe is the same shape: ``phases()`` lists the bound methods one iteration runs, in
order, and each reads and fills one ``state_type`` instance (a dataclass: what the phases
hand each other, every field named). A recipe built on another overrides the phases it
changes, adds its own, and lists them; it never copies the ones it keeps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from eglp_dist.runtime.checkpoint import Stateful
from eglp_dist.runtime.engine import Engine
from eglp_dist.runtime.engines import build_engine
from eglp_dist.runtime.env import DistEnv
from eglp_dist.runtime.parts import is_run_wide
from eglp_dist.models import build_segmentor

_RANK_STRIDE = 1_000_003  # keeps per-rank generator seeds of nearby run seeds apart


def method_seed(seed: int, rank: int) -> int:
    return int(seed) + _RANK_STRIDE * (rank + 1)


@dataclass
class StepState:
    """What every recipe's phases share in one iteration; a recipe's own hand-overs are the
    fields of its subclass (``methods/uda.py``, ``methods/eglp.py``)."""
    it: int
    batches: Mapping[str, Dict[str, Any]]
    logs: Dict[str, torch.Tensor] = field(default_factory=dict)
    visuals: Dict[str, Optional[torch.Tensor]] = field(default_factory=dict)


class Method:
    """Base of every recipe: the student engine, the generator, the checkpoint plumbing and
    the phase loop."""

    streams: Tuple[str, ...] = ("source",)
    state_type = StepState
    # streams whose labels the loop reads for diagnostics only (batch key ``gt``): UDA's
    # target when the pseudo-label IoU is on
    ground_truth_streams: Tuple[str, ...] = ()

    def __init__(self, cfg, env: DistEnv, device: torch.device):
        self.cfg, self.env, self.device = cfg, env, device
        self.engines: Dict[str, Engine] = {}
        self.modules: Dict[str, Stateful] = {}  # run-wide parts
        self.rank_parts: Dict[str, Stateful] = {}  # per-rank parts
        self.generator = torch.Generator().manual_seed(method_seed(cfg.run.seed, env.rank))
        self.mean = list(cfg.data.mean)
        self.std = list(cfg.data.std)
        self._visuals: Dict[str, torch.Tensor] = {}
        # Same weights on every rank: the model is built from the run seed, before any
        # per-rank randomness (DDP and DeepSpeed would broadcast rank 0's anyway).
        torch.manual_seed(cfg.run.seed)
        self.student = self.add_engine("student", build_segmentor(cfg.model))

    def add_engine(self, name: str, model: nn.Module, optim_cfg=None, schedule_cfg=None,
                   engine_cfg=None) -> Engine:
        """A trained network as an engine with its own optimiser, schedule and wrapper
        settings (default: the run's top-level ``optim``/``schedule``/``engine`` nodes)."""
        o = optim_cfg if optim_cfg is not None else self.cfg.optim
        groups = model.param_groups(o.lr, o.weight_decay, o.head_lr_mult)
        engine = build_engine(name, model, groups, o,
                              schedule_cfg if schedule_cfg is not None else self.cfg.schedule,
                              self.cfg.trainer.max_iters,
                              engine_cfg if engine_cfg is not None else self.cfg.engine, self.env, self.device)
        self.engines[name] = engine
        return engine

    def add_part(self, name: str, part: Stateful) -> Stateful:
        """Register a part that changes during training; saved by its ``run_wide`` type."""
        (self.modules if is_run_wide(part, name) else self.rank_parts)[name] = part
        return part

    # -- the loop's interface ------------------------------------------------------------
    def phases(self) -> Sequence[Callable[[StepState], None]]:
        """One iteration's phases, in order (bound methods of this recipe)."""
        raise NotImplementedError

    def step(self, batches: Mapping[str, Dict[str, Any]], it: int) -> Dict[str, torch.Tensor]:
        s = self.state_type(it=it, batches=batches)
        for phase in self.phases():
            phase(s)
        self.keep_visual(**s.visuals)
        return s.logs

    def optimizer_step(self, s: StepState) -> None:
        """One optimiser step of every engine (the last phase of every recipe)."""
        for engine in self.engines.values():
            engine.step()

    def eval_model(self) -> nn.Module:
        """The network evaluated and exported: the student, as DAFormer/HRDA evaluate it."""
        return self.student.model

    def visuals(self) -> Dict[str, torch.Tensor]:
        """Last step's pictures (first image of the batch): ``*_img`` normalised images,
        ``*_seg`` label maps (train ids, 255 ignored), ``*_pred`` logits or label maps."""
        return self._visuals

    def sync_buffers(self) -> None:
        """Rank 0's buffers (batch-norm statistics) in every engine and everything beside them
        that has buffers (EMA teachers): before evaluation and checkpoint, one model everywhere."""
        for engine in self.engines.values():
            engine.sync_buffers()
        for state in self.modules.values():
            if hasattr(state, "sync_buffers"):
                state.sync_buffers()

    def counters(self) -> list:
        """Counts reduced and summarised at each log interval (``logging.Counter``)."""
        return []

    def lrs(self) -> Dict[str, float]:
        return {f"{name}/{i}": lr for name, eng in self.engines.items() for i, lr in enumerate(eng.lrs())}

    def state_dict(self) -> Dict[str, Any]:
        """Per-rank state (saved by every rank): the generator and the per-rank parts."""
        return {"generator": self.generator.get_state(),
                **{name: part.state_dict() for name, part in self.rank_parts.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        for name, part in self.rank_parts.items():
            part.load_state_dict(state[name])

    def reseed(self, step: int) -> None:
        """A rank resumed without a saved state of its own (the run now has more ranks): its
        generator from (seed, rank, step), distinct from every other rank's; per-rank parts
        of a recipe (EGLP's memory bank) start empty."""
        self.generator.manual_seed(method_seed(self.cfg.run.seed, self.env.rank) + 7_919 * step)

    # -- helpers for recipes -------------------------------------------------------------
    def keep_visual(self, **tensors: Optional[torch.Tensor]) -> None:
        """Keep the first image of each tensor for ``visuals()``. Called every step, so it
        stays on the device (a small copy, no host transfer that would wait for the GPU);
        pass predictions already sliced (``logits[:1].argmax(1)``) to skip the rest."""
        for key, value in tensors.items():
            if value is not None:
                self._visuals[key] = value[:1].detach().clone()

    def train_forward(self, engine: Engine, images: torch.Tensor, seg: torch.Tensor,
                      weight: Optional[torch.Tensor] = None, prefix: str = "src"):
        """Training forward of ``images`` through ``engine`` (HRDA boxes and SPN prompts drawn
        from the method's generator) and the model's (weighted) segmentation losses.
        Returns (outputs, losses, log dict of ``prefix.``-named detached tensors: the loop
        turns them into numbers only at log intervals, so no step waits on the GPU); the caller adds
        any further terms and calls ``engine.backward``."""
        outputs = engine(images, mode="train", generator=self.generator)
        losses = engine.model.losses(outputs, seg, weight)
        return outputs, losses, {f"{prefix}.{k}": v.detach() for k, v in losses.items() if k != "loss"}
