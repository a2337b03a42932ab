"""Composing YAML files and merging them onto structured configs, with every key and value
checked and named: the one merge every config goes through (run configs in
``eglp_dist/config.py``, model files in ``models/config.py``, second-network overrides in
``methods/pig.py``). A leaf module: it knows no component's dataclasses, so components can use
it without importing the run config that imports them all.
"""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from eglp_dist.config_fields import check_fields
from eglp_dist.errors import ConfigError
from eglp_dist.resources import resource_dir

PACKAGE_CONFIG_ROOT = resource_dir("configs")


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


def flat_items(node: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """(dotted key, value) of every leaf of a nested mapping (a dict or a DictConfig)."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from flat_items(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


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


def merge_checked(schema: DictConfig, update: DictConfig, origin: str, prefix: str = "") -> DictConfig:
    """Merge `update` onto a structured config, rejecting unknown keys and bad values by name
    (``prefix``: the dotted key of ``schema`` in the run config, e.g. ``model.``)."""
    check_keys(schema, update, origin, prefix)
    try:
        merged = OmegaConf.merge(schema, update)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or _first_leaf(update, "").lstrip(".") or "?"
        msg = str(exc).splitlines()[0]
        where = f" (in {origin})" if origin else ""
        raise ConfigError(f"bad value for config key '{prefix}{key}'{where}: {msg}") from exc
    try:
        check_fields(merged, prefix)  # every field's choices and bounds, on every merge
    except ConfigError as exc:
        raise ConfigError(f"{exc}" + (f" (in {origin})" if origin else "")) from None
    return merged
