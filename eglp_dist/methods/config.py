"""Config of the training recipe (owned by methods/). Extended by the training-engine issue."""
from __future__ import annotations

from dataclasses import dataclass

from eglp_dist.config_fields import choice


@dataclass
class MethodConfig:
    name: str = choice("source_only", ["source_only", "uda", "eglp", "spn"])
