"""Which engine a config builds, and reading either engine's checkpoint without one."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable

import torch
import torch.nn as nn

from eglp_dist.optim import build_optimizer, build_scheduler
from eglp_dist.runtime.checkpoint import read_file
from eglp_dist.runtime.ddp_engine import ENGINE_FILE, DDPEngine
from eglp_dist.runtime.engine import Engine
from eglp_dist.runtime.env import DistEnv
from eglp_dist.runtime.zero_engine import DS_TAG, DeepSpeedEngine


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
