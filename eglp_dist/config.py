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

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from eglp_dist.atomic import write_text_atomic
from eglp_dist.config_fields import check_fields, choice, non_negative, positive
from eglp_dist.data.config import DataConfig, check_data_config
from eglp_dist.errors import ConfigError
from eglp_dist.methods.config import MethodConfig
from eglp_dist.models.config import ModelConfig
from eglp_dist.resources import resource_dir, shipped_config

PACKAGE_CONFIG_ROOT = resource_dir("configs")


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"  # the run folder is out_dir/name
    seed: int = 0


@dataclass
class DistConfig:
    backend: str = choice("auto", ["auto", "nccl", "gloo"])  # auto: NCCL with CUDA, gloo without
    timeout_s: int = positive(1800)  # collective timeout


@dataclass
class EngineConfig:
    """How optimised models are wrapped: torch DDP or DeepSpeed ZeRO stage 1/2."""
    kind: str = choice("ddp", ["ddp", "zero1", "zero2"])
    precision: str = choice("auto", ["auto", "fp32", "bf16"])  # auto: bf16 autocast on CUDA, fp32 on CPU
    grad_accum: int = positive(1)  # optimizer steps every grad_accum iterations
    grad_clip: Optional[float] = None  # max global grad norm; None = off (DAFormer/HRDA use none)
    bucket_mb: int = positive(25)  # DDP bucket_cap_mb and ZeRO reduce/allgather bucket size
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
class TrainerConfig:
    max_iters: int = positive(40000)
    log_interval: int = positive(50)
    eval_interval: int = positive(4000)
    ckpt_interval: int = positive(4000)
    keep_last: int = positive(3)
    image_interval: int = positive(1000)  # picture grids to TensorBoard every K iterations
    resume: str = "auto"  # auto | never | path to a checkpoint folder


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

def config_root_for(path: Path) -> Path:
    """The `configs/` folder that group names (model=..., engine=...) refer to: the nearest
    ancestor of the file called `configs`, else the one shipped with the package."""
    for parent in path.resolve().parents:
        if parent.name == "configs":
            return parent
    return PACKAGE_CONFIG_ROOT


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _group_file(root: Path, group: str, name: str, origin: str) -> Path:
    path = root / group / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in (root / group).glob("*.yaml"))
        if not (root / group).is_dir():
            raise ConfigError(f"{origin}: no config group {group!r} (no folder {root / group})")
        raise ConfigError(f"{origin}: no config {name!r} in group {group!r} "
                          f"(available: {', '.join(available)})")
    return path


def compose_file(path: Path, root: Optional[Path] = None, _seen: Tuple[Path, ...] = (),
                 choices: Optional[Dict[str, str]] = None) -> DictConfig:
    """Read a YAML file and everything its `defaults:` list names, merged in order.
    ``choices`` (group -> name, from the command line) replace the `group: name` entries of
    that group anywhere in the defaults tree, as Hydra's group overrides do."""
    choices = choices or {}
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: defaults form a cycle: {' -> '.join(map(str, _seen + (path,)))}")
    root = root or config_root_for(path)
    data = _read_yaml(path)
    defaults = data.pop("defaults", []) or []
    if not isinstance(defaults, list):
        raise ConfigError(f"{path}: 'defaults' must be a list")
    merged = OmegaConf.create({})
    for entry in defaults:
        if isinstance(entry, str):
            part = compose_file(path.parent / entry, root, _seen + (path,), choices)
        elif isinstance(entry, dict) and len(entry) == 1:
            (group, name), = entry.items()
            group_path = _group_file(root, group, str(choices.get(group, name)), str(path))
            part = OmegaConf.create({group: compose_file(group_path, root, _seen + (path,))})
        else:
            raise ConfigError(f"{path}: a defaults entry must be 'file.yaml' or 'group: name', got {entry!r}")
        merged = OmegaConf.merge(merged, part)
    return OmegaConf.merge(merged, OmegaConf.create(data))


def _schema_keys(node: Any, prefix: str = "") -> List[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            keys.extend(_schema_keys(node._get_node(k), full + "."))
    return keys


def _is_open_dict(node: DictConfig) -> bool:
    """A Dict[str, X] field (free keys) rather than a dataclass (fixed keys)."""
    obj_type = node._metadata.object_type
    return obj_type is None or obj_type is dict


def _first_leaf(node: Any, prefix: str) -> str:
    """`not` + {a: {key: 1}} -> `not.a.key`: name the key the user actually wrote."""
    while isinstance(node, DictConfig) and len(node) == 1:
        (k,) = node.keys()
        prefix, node = f"{prefix}.{k}", node._get_node(k)
    return prefix


def check_keys(schema: DictConfig, update: Any, origin: str, prefix: str = "") -> None:
    """Reject keys of `update` that the schema does not have, naming the dotted key."""
    if not isinstance(update, DictConfig):
        return
    for key in update.keys():
        full = f"{prefix}{key}"
        if key not in schema:
            full = _first_leaf(update._get_node(key), full)
            candidates = _schema_keys(schema, prefix)
            close = difflib.get_close_matches(full, candidates, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            where = f" (in {origin})" if origin else ""
            raise ConfigError(f"unknown config key '{full}'{where}{hint}")
        sub = schema._get_node(key)
        value = update._get_node(key)
        _check_shape(sub, value, full, origin)
        if isinstance(sub, DictConfig) and not _is_open_dict(sub):
            check_keys(sub, value, origin, full + ".")
        elif isinstance(sub, DictConfig) and _section_type(sub) is not None:
            _check_sections(sub, value, origin, full)


def _section_type(node: DictConfig) -> Optional[type]:
    """The dataclass of the values of a ``Dict[str, Section]`` field (e.g. ``data.val``)."""
    element = node._metadata.element_type
    return element if dataclasses.is_dataclass(element) else None


def _check_sections(schema: DictConfig, update: Any, origin: str, key: str) -> None:
    """Each entry of a mapping of sections, checked as that section; a key of the section
    written directly under the mapping (the single-stream ``data.val.shards=...`` of older
    configs) gets an error that says how to name the entry."""
    if not isinstance(update, DictConfig):
        return
    section = _section_type(schema)
    fields = [f.name for f in dataclasses.fields(section)]
    element = OmegaConf.structured(section)
    where = f" (in {origin})" if origin else ""
    for name in update.keys():
        value = update._get_node(name)
        if name in fields:
            raise ConfigError(
                f"config key '{key}.{name}'{where}: {key} maps names to sections ({', '.join(fields)}); "
                f"write {key}.NAME.{name}=... (one NAME per entry; what a single-section config "
                f"called {key}.{name} is {key}.{key.rsplit('.', 1)[-1]}.{name})")
        if not isinstance(value, DictConfig):
            raise ConfigError(f"config key '{key}.{name}'{where} is a section ({', '.join(fields)}), "
                              f"not a single value; e.g. {key}.{name}.{fields[0]}=...")
        check_keys(element, value, origin, f"{key}.{name}.")


def _check_shape(schema_node: Any, value: Any, key: str, origin: str) -> None:
    """A section given a single value, or a list field a scalar: said in the user's terms
    (OmegaConf's own message names no key, or speaks of AnyNode and ListConfig)."""
    where = f" (in {origin})" if origin else ""
    scalar = not isinstance(value, (DictConfig, ListConfig)) and value is not None \
        and getattr(value, "_value", lambda: None)() is not None
    if isinstance(schema_node, DictConfig) and scalar and not schema_node._is_none():
        shown = ", ".join(list(schema_node.keys())[:6])
        first = next(iter(schema_node.keys()), "key")
        raise ConfigError(f"config key '{key}'{where} is a section (with keys {shown}, ...), not a "
                          f"single value; set one of its keys, e.g. {key}.{first}=...")
    if isinstance(schema_node, ListConfig) and scalar:
        raise ConfigError(f"config key '{key}'{where} takes a list, e.g. {key}=[1,2]; got the single "
                          f"value {value._value()!r}")


def merge_checked(schema: DictConfig, update: DictConfig, origin: str) -> DictConfig:
    """Merge `update` onto a structured config, rejecting unknown keys and bad values by name."""
    check_keys(schema, update, origin)
    try:
        merged = OmegaConf.merge(schema, update)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or _first_leaf(update, "").lstrip(".") or "?"
        msg = str(exc).splitlines()[0]
        where = f" (in {origin})" if origin else ""
        raise ConfigError(f"bad value for config key '{key}'{where}: {msg}") from exc
    try:
        check_fields(merged)  # every field's choices and bounds, on every merge
    except ConfigError as exc:
        raise ConfigError(f"{exc}" + (f" (in {origin})" if origin else "")) from None
    return merged


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
    check_data_config(cfg.data)  # what relates several data keys (shard lists, class sets, ...)
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(f"config keys without a value: {', '.join(sorted(missing))}")
    OmegaConf.set_readonly(cfg, True)
    return cfg


def resolved_yaml(cfg: DictConfig) -> str:
    """The fully resolved config as YAML: what a run can be reproduced from."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_resolved(cfg: DictConfig, path: os.PathLike | str) -> None:
    write_text_atomic(path, resolved_yaml(cfg))


def to_plain(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
