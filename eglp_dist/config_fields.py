"""Field helpers for the structured configs, importable by every component's config module
without importing :mod:`eglp_dist.config` (which imports them all)."""
from __future__ import annotations

from dataclasses import field
from typing import Any, Sequence

CHOICES = "choices"


def choice(default: Any, options: Sequence[Any]) -> Any:
    """A dataclass field whose value must be one of ``options``; checked at config load with
    an error naming the key (OmegaConf itself only checks types)."""
    if default not in options:
        raise ValueError(f"default {default!r} not among {list(options)}")
    return field(default=default, metadata={CHOICES: tuple(options)})


def positive(default: Any) -> Any:
    """A number that must be > 0."""
    return field(default=default, metadata={"min": 0, "min_exclusive": True})


def non_negative(default: Any) -> Any:
    """A number that must be >= 0."""
    return field(default=default, metadata={"min": 0, "min_exclusive": False})
