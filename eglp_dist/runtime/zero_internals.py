"""The private members of DeepSpeed's ZeRO-1/2 optimizer this project relies on, in one place,
checked against the installed DeepSpeed when a ZeRO engine is built.

DeepSpeed has no public API to load an optimizer state saved by another number of ranks (its
elastic loader wants the same world size and a group-level ``step`` torch's AdamW does not
keep) nor to re-link the parameters' tensor fragments after a checkpoint load. The ZeRO engine
(``engine.DeepSpeedEngine``) does both with four private members of
``DeepSpeedZeroOptimizer``. A DeepSpeed that renamed one would otherwise fail only at a resume,
perhaps hours into a job; ``check`` runs at build time instead: a missing member is an error
naming it and the installed version, a version outside the tested series a note.
"""
from __future__ import annotations

from typing import Any, List

from eglp_dist.errors import ConfigError
from eglp_dist.notices import notice

TESTED_SERIES = ((0, 19),)  # (major, minor) tested by the suite; requirements pin 0.19.8
METHODS = ("_load_global_state", "_partition_base_optimizer_state", "_lazy_init_hp_params_optimizer_state")
ATTRIBUTES = ("_hp_optimizer_states_linked",)


def _series(version: str) -> tuple:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else -1)
    return tuple(parts)


def missing_members(zero_opt: Any) -> List[str]:
    return ([m for m in METHODS if not callable(getattr(zero_opt, m, None))]
            + [a for a in ATTRIBUTES if not hasattr(zero_opt, a)])


def check(zero_opt: Any, kind: str, version: str) -> None:
    """Raise if ``zero_opt`` lacks a member used here; note a DeepSpeed outside the tested series."""
    missing = missing_members(zero_opt)
    tested = ", ".join(f"{a}.{b}" for a, b in TESTED_SERIES)
    if missing:
        raise ConfigError(
            f"engine.kind={kind}: DeepSpeed {version}'s {type(zero_opt).__name__} lacks "
            f"{', '.join(missing)}, which elastic checkpoints (resume on another number of ranks) "
            f"need; install a tested DeepSpeed ({tested}; requirements pin 0.19.8) or use engine.kind=ddp")
    if _series(version) not in TESTED_SERIES:
        notice(f"engine.kind={kind}: DeepSpeed {version} is outside the tested series ({tested}); its "
               f"private ZeRO members used for elastic resume exist, but their behaviour is untested")


def load_global_state(zero_opt: Any, state: dict) -> None:
    """Per-optimizer scalars (loss scaler, clipping, ...) of one saved rank's state."""
    zero_opt._load_global_state(state)


def partition_state(zero_opt: Any, key: str, saved: list, group: int):
    """The saved ranks' flat ``key`` tensors of ``group``, merged and sliced to this rank's
    partition under this world's alignment."""
    return zero_opt._partition_base_optimizer_state(key, saved, group)


def relink_fragments(zero_opt: Any) -> None:
    """Point every parameter's fragment mapping at the optimizer state again. DeepSpeed links
    them at the first step only; its checkpoint loader re-creates the mappings without them, so
    until the next step ``safe_get_full_optimizer_state`` would fail."""
    zero_opt._hp_optimizer_states_linked = False
    zero_opt._lazy_init_hp_params_optimizer_state()
