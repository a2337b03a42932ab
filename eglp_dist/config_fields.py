"""Field rules of the structured configs, declared on the dataclass field and enforced by one
function, :func:`check_fields`, wherever a config comes into being: every merge of
``config.merge_checked`` (files, groups, command line, model files) and the component
checks (``data.config.check_data_config``, ``models.config.validate``) for configs built
directly as dataclasses. Component checks keep only the rules that relate several keys.

Importable by every component's config module without importing :mod:`eglp_dist.config`
(which imports them all).
"""
from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Optional, Sequence

from eglp_dist.errors import ConfigError

CHOICES = "choices"
RANGE = "range"  # (lo, hi, lo_open, hi_open); None = unbounded on that side
CLASS_LIST = "class_list"  # a list of class indices, checked against model.num_classes at build


def choice(default: Any, options: Sequence[Any]) -> Any:
    """A dataclass field whose value must be one of ``options``; checked at config load with
    an error naming the key (OmegaConf itself only checks types)."""
    if default not in options:
        raise ValueError(f"default {default!r} not among {list(options)}")
    return field(default=default, metadata={CHOICES: tuple(options)})


def in_range(default: Any, lo: Optional[float] = None, hi: Optional[float] = None,
             lo_open: bool = False, hi_open: bool = False) -> Any:
    """A number within [lo, hi] (an end open where asked; None: no bound). ``None`` values of
    Optional fields pass."""
    return field(default=default, metadata={RANGE: (lo, hi, lo_open, hi_open)})


def positive(default: Any) -> Any:
    """A number that must be > 0."""
    return in_range(default, 0, None, lo_open=True)


def non_negative(default: Any) -> Any:
    """A number that must be >= 0."""
    return in_range(default, 0)


def probability(default: float) -> Any:
    """A number in [0, 1]."""
    return in_range(default, 0, 1)


def class_list(default: Sequence[int]) -> Any:
    """A list of class indices (train ids); at build time every index must lie in
    [0, model.num_classes) (:func:`check_class_lists`), since the config merge does not know
    the number of classes yet."""
    return field(default_factory=lambda: list(default), metadata={CLASS_LIST: True})


def check_class_lists(cfg: Any, num_classes: int, prefix: str = "") -> None:
    """Every ``class_list`` field of ``cfg`` and its nested sections: indices in
    [0, num_classes), no repeats; ConfigError naming the dotted key and the bad indices."""
    for key, f, value in iter_fields(cfg, prefix):
        if not f.metadata.get(CLASS_LIST) or value is None:
            continue
        values = list(value)
        bad = [c for c in values if not isinstance(c, int) or not 0 <= c < num_classes]
        if bad:
            raise ConfigError(f"bad value for config key '{key}': class indices {bad} are outside "
                              f"[0, {num_classes}) (model.num_classes={num_classes})")
        if len(set(values)) != len(values):
            raise ConfigError(f"bad value for config key '{key}': {values} lists a class twice")


def _range_text(lo, hi, lo_open, hi_open) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {hi}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def _value_ok(value, lo, hi, lo_open, hi_open) -> bool:
    if lo is not None and (value < lo or (lo_open and value == lo)):
        return False
    return not (hi is not None and (value > hi or (hi_open and value == hi)))


def _dataclass_of(value) -> Optional[type]:
    """The dataclass type of a nested section: a dataclass instance or a structured DictConfig."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return type(value)
    meta = getattr(value, "_metadata", None)
    obj_type = getattr(meta, "object_type", None)
    return obj_type if dataclasses.is_dataclass(obj_type) else None


def _sections_of(value) -> Optional[type]:
    """The dataclass of the entries of a ``Dict[str, Section]`` value (e.g. ``data.val``)."""
    meta = getattr(value, "_metadata", None)
    element = getattr(meta, "element_type", None)
    if dataclasses.is_dataclass(element):
        return element
    if isinstance(value, dict) and value and all(dataclasses.is_dataclass(v) for v in value.values()):
        return type(next(iter(value.values())))
    return None


def iter_fields(cfg: Any, prefix: str = ""):
    """(dotted key, dataclass field, value) of every field of ``cfg`` (a dataclass instance
    or a structured DictConfig) and of its nested sections, ``Dict[str, Section]`` entries
    included, parents before their children."""
    dc_type = _dataclass_of(cfg)
    if dc_type is None:
        return
    for f in dataclasses.fields(dc_type):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        yield key, f, value
        if _dataclass_of(value) is not None:
            yield from iter_fields(value, key + ".")
        elif _sections_of(value) is not None:
            for name in value.keys():
                yield from iter_fields(value[name], f"{key}.{name}.")


def check_fields(cfg: Any, prefix: str = "") -> None:
    """Every field rule (choices, ranges) of ``cfg`` and its nested sections, a dataclass
    instance or a structured DictConfig; ConfigError names the dotted key."""
    for key, f, value in iter_fields(cfg, prefix):
        if CHOICES in f.metadata and value not in f.metadata[CHOICES]:
            raise ConfigError(f"bad value for config key '{key}': {value!r} is not one of "
                              f"{list(f.metadata[CHOICES])}")
        if RANGE in f.metadata and value is not None and not _value_ok(value, *f.metadata[RANGE]):
            raise ConfigError(f"bad value for config key '{key}': {value!r} must be "
                              f"{_range_text(*f.metadata[RANGE])}")
