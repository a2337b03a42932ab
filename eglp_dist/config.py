"""Run configuration: structured defaults <- YAML file (with ``defaults:`` includes) <- CLI.

Every component owns a dataclass (``data/config.py``, ``models/config.py``, ...); ``Config``
composes them. A YAML file may start with a ``defaults:`` list whose entries are merged first,
in order, and then the file's own keys on top:

    defaults:
      - ../base.yaml        # another file, path relative to this one
      - model: tiny_hrda    # configs/model/tiny_hrda.yaml merged into the `model` node
      - engine: ddp         # configs/engine/ddp.yaml merged into the `engine` node

On the command line, ``key.sub=value`` sets a value and ``GROUP=NAME`` (e.g. ``engine=zero2``)
merges ``configs/GROUP/NAME.yaml`` into that node, exactly like a ``defaults:`` entry.

Unknown keys, wrongly typed values and values outside a field's choices fail at load with a
:class:`~eglp_dist.errors.ConfigError` naming the dotted key (and the closest valid key).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from eglp_dist.atomic import write_text_atomic
from eglp_dist.config_fields import choice, non_negative, positive
from eglp_dist.config_merge import (PACKAGE_CONFIG_ROOT, _group_file, _read_yaml,  # noqa: F401 (PACKAGE_CONFIG_ROOT: re-exported)
                                    compose_file, config_root_for, flat_items, merge_checked)
from eglp_dist.data.config import DataConfig, check_data_config
from eglp_dist.errors import ConfigError
from eglp_dist.methods.config import MethodConfig
from eglp_dist.models.config import ModelConfig
from eglp_dist.resources import shipped_config


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"  # the run folder is out_dir/name
    seed: int = 0


@dataclass
class DistConfig:
    backend: str = choice("auto", ["auto", "nccl", "gloo"])  # auto: NCCL with CUDA, gloo without
    timeout_s: int = positive(1800)  # collective timeout at start-up, checkpoints, evaluation
    # collective timeout of training steps (and the wait for a batch): a rank that stops
    # answering makes the others fail this long after, naming the iteration and the wait
    step_timeout_s: int = positive(600)


@dataclass
class EngineConfig:
    """How optimised models are wrapped: torch DDP or DeepSpeed ZeRO stage 1/2."""
    kind: str = choice("ddp", ["ddp", "zero1", "zero2"])
    # auto: bf16 autocast on CUDA, fp32 on CPU; fp32: torch's defaults (full-precision matmuls,
    # cuDNN convolutions may use TF32); tf32: fp32 with matmuls in TF32 too (Ampere and later)
    precision: str = choice("auto", ["auto", "fp32", "tf32", "bf16"])
    grad_accum: int = positive(1)  # optimizer steps every grad_accum iterations
    grad_clip: Optional[float] = None  # max global grad norm; None = off (DAFormer/HRDA use none)
    bucket_mb: int = positive(25)  # MiB: DDP bucket_cap_mb and ZeRO reduce/allgather buckets (of fp32 grads)
    overlap_comm: bool = False  # ZeRO: overlap gradient reduction with backward
    find_unused_parameters: bool = False  # DDP


@dataclass
class OptimConfig:
    """AdamW as DAFormer/HRDA: lr 6e-5, betas (0.9, 0.999), wd 0.01, heads at 10x."""
    name: str = choice("adamw", ["adamw", "sgd"])
    lr: float = positive(6e-5)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = non_negative(0.9)  # sgd only
    weight_decay: float = non_negative(0.01)
    head_lr_mult: float = positive(10.0)


@dataclass
class ScheduleConfig:
    """Linear warm-up then polynomial decay, mmseg's `poly` with `warmup='linear'`."""
    warmup_iters: int = non_negative(1500)
    warmup_ratio: float = non_negative(1e-6)
    power: float = non_negative(1.0)
    min_lr_ratio: float = non_negative(0.0)


@dataclass
class GuardConfig:
    """The loop's control point (control.py): preemption signals and bad steps."""
    # each makes every rank stop at the same step boundary after a checkpoint (exit 75)
    stop_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    max_bad_steps: int = positive(5)  # non-finite steps in a row that stop the run
    inject_nan_steps: List[int] = field(default_factory=list)  # tests: NaN loss on rank 0 at these iterations


@dataclass
class TrainerConfig:
    max_iters: int = positive(40000)
    log_interval: int = positive(50)
    eval_interval: int = non_negative(4000)  # 0: no evaluation (else data.val needs shards)
    ckpt_interval: int = positive(4000)
    keep_last: int = positive(3)
    image_interval: int = positive(1000)  # picture grids to TensorBoard every K iterations
    resume: str = "auto"  # auto | never | path to a checkpoint folder
    guard: GuardConfig = field(default_factory=GuardConfig)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)


# ----------------------------------------------------------------------------- loading

def parse_overrides(overrides: Iterable[str], root: Path) -> Tuple[Dict[str, Tuple[str, Path]],
                                                                   List[Tuple[str, DictConfig]]]:
    """Command-line items -> ({group: (origin, file)} for `GROUP=NAME`, [(origin, partial
    config)] for `key=value`, in order)."""
    groups: Dict[str, Tuple[str, Path]] = {}
    parts = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command-line override {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        key = key.strip().lstrip("+")
        origin = f"command line '{item}'"
        if "." not in key and (root / key).is_dir() and value and "/" not in value:
            groups[key] = (origin, _group_file(root, key, value, origin))
        else:
            try:
                parts.append((origin, OmegaConf.from_dotlist([f"{key}={value}"])))
            except OmegaConfBaseException as exc:
                raise ConfigError(f"{origin}: cannot parse: {exc}") from exc
    return groups, parts


def _selected_in(path: Path, root: Path, group: str, _seen: Tuple[Path, ...] = ()) -> bool:
    """Whether the defaults tree of ``path`` has a `group: name` entry (so a command-line
    choice of that group was substituted into it by compose_file)."""
    path = path.resolve()
    if path in _seen:
        return False
    for entry in _read_yaml(path).get("defaults", []) or []:
        if isinstance(entry, dict) and group in entry:
            return True
        if isinstance(entry, str) and _selected_in(path.parent / entry, root, group, _seen + (path,)):
            return True
    return False


def load_config(path: os.PathLike | str, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults <- file (with its defaults) <- overrides, validated. Returns a read-only
    structured DictConfig (attribute access, typed)."""
    path = shipped_config(Path(path))
    root = config_root_for(path)
    schema = OmegaConf.structured(Config)
    groups, parts = parse_overrides(overrides, root)
    composed = compose_file(path, root, choices={g: f.stem for g, (_, f) in groups.items()})
    cfg = merge_checked(schema, composed, str(path))
    for group, (origin, group_path) in groups.items():
        if not _selected_in(path, root, group):
            # the file named no such group: the node is replaced by the group's file on top
            # of the node's defaults (its own keys for that node are dropped, as the group
            # selection says "this node is that file")
            node = merge_checked(OmegaConf.structured(Config), OmegaConf.create(
                {group: compose_file(group_path, root)}), origin)[group]
            cfg[group] = node
    for origin, part in parts:  # value overrides apply after every group selection
        cfg = merge_checked(cfg, part, origin)
    say_unused_method_keys(cfg, [k for _, part in parts for k, _ in flat_items(part)])
    check_data_config(cfg.data)  # what relates several data keys (shard lists, class sets, ...)
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(f"config keys without a value: {', '.join(sorted(missing))}")
    OmegaConf.set_readonly(cfg, True)
    return cfg


def say_unused_method_keys(cfg, keys: Sequence[str]) -> None:
    """One line (rank 0) per command-line key of a method node the active method does not
    read (``method.eglp.dnis.temperature=7`` on a ``uda`` run): it has no effect."""
    from eglp_dist.methods.config import NODES_USED
    from eglp_dist.notices import notice

    used = NODES_USED.get(cfg.method.name, ())
    for key in keys:
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "method" and parts[1] not in used:
            notice(f"{key} has no effect: method.name={cfg.method.name} does not read method.{parts[1]} "
                   f"(it reads {', '.join(f'method.{n}' for n in used) or 'no method node'})")


def resolved_yaml(cfg: DictConfig) -> str:
    """The fully resolved config as YAML: what a run can be reproduced from."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_resolved(cfg: DictConfig, path: os.PathLike | str) -> None:
    write_text_atomic(path, resolved_yaml(cfg))


def to_plain(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
