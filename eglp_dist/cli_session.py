"""What ``eglp eval`` and ``eglp predict`` share before they compute anything: the config,
the checkpoint's weights in a model, the launch environment, the process group and the
device (:func:`cli_session`), and which evaluation targets to read (:func:`eval_targets`).
Its own module so that prediction export does not import evaluation to get its setup."""
from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from eglp_dist.runtime.precision import autocast_dtype
from eglp_dist.weights import load_into, load_weights, resolve_checkpoint_dir


@dataclass
class CliSession:
    """What ``eglp eval`` and ``eglp predict`` run with: the config, this rank's launch
    environment and device, the model with the checkpoint's weights, on that device."""

    cfg: Any
    env: Any
    device: torch.device
    model: nn.Module
    owns_group: bool  # the process group was created here (and is ended here)
    checkpoint: Path  # the weight file or resolved iter_XXXXXXX folder the weights came from
    amp: Optional[torch.dtype]

    def eval_loader(self, stream: Any, name: str):
        """This rank's share of an eval stream (a ``cfg.data.val`` target or ``test``), batch 1."""
        from eglp_dist.data.loader import build_eval_loader

        return build_eval_loader(stream, self.cfg.data, self.env.rank, self.env.world_size, self.device,
                                 name=name)


def _open_session(args: argparse.Namespace) -> CliSession:
    """Config, weights and model (all before any process group, so bad input fails fast on
    every rank alike), then the process group and this rank's device."""
    from omegaconf import OmegaConf

    import torch.distributed as tdist

    from eglp_dist.config import load_config
    from eglp_dist.runtime.env import detect_env, init_distributed
    from eglp_dist.models import build_segmentor

    cfg = load_config(args.config, list(args.overrides or []))
    ckpt = Path(args.checkpoint)
    where = ckpt if ckpt.is_file() else resolve_checkpoint_dir(ckpt)
    state = load_weights(where)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg["pretrained"] = model_cfg["init_from"] = None  # every weight comes from the checkpoint
    model = build_segmentor(model_cfg)
    load_into(model, state, str(where))
    env = detect_env(local_rank_arg=getattr(args, "local_rank", None))
    owns_group = not tdist.is_initialized()
    device = init_distributed(env, cfg.dist.backend, cfg.dist.timeout_s)
    model.to(device)
    return CliSession(cfg, env, device, model, owns_group, where,
                      autocast_dtype(cfg.engine.precision, device))


@contextlib.contextmanager
def cli_session(args: argparse.Namespace) -> Iterator[CliSession]:
    """The setup of ``eglp eval`` / ``eglp predict`` (``args``: config, checkpoint, overrides,
    local_rank) for the block; a process group it created is shut down afterwards."""
    from eglp_dist.runtime.env import shutdown

    session = _open_session(args)
    try:
        yield session
    finally:
        if session.owns_group:
            shutdown()


def eval_targets(cfg, names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The configured evaluation targets (``data.val``, those with shards), or the ``names``
    asked for; ConfigError naming the unknown one or saying that none is configured."""
    from eglp_dist.errors import ConfigError

    configured = {n: t for n, t in cfg.data.val.items() if t.shards}
    if names:
        unknown = [n for n in names if n not in configured]
        if unknown:
            raise ConfigError(f"data.val.{unknown[0]}: no such evaluation target with shards "
                              f"(configured: {', '.join(configured) or 'none'})")
        return {n: configured[n] for n in names}
    if not configured:
        raise ConfigError("data.val: no evaluation target has shards; set data.val.NAME.shards=FOLDER")
    return configured
