"""Reading trained weights: weight files, run checkpoints, strict loading into a model.

Kept apart from inference (``evaluate.py``) and from encoder conversion
(``models/convert.py``) because both need it: :func:`read_weight_file` is the one reader of
user-given ``.pt``/``.pth`` files (tensor-only ``torch.load``, container unwrapping, DDP
``module.`` prefixes), ``convert.read_state_dict`` only adds the encoder-prefix step on top.
Checkpoint folders are found with ``runtime/checkpoint.py``'s own marker, name pattern and
``find_latest``, so the layout is defined in one place.

    state_dict = load_weights("runs/x/checkpoints/latest")  # fp32, plain keys
    load_into(model, state_dict, "runs/x")                  # strict; DataError on mismatch
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping

import torch
import torch.nn as nn

from eglp_dist.runtime.checkpoint import COMPLETE, ITER_RE, find_latest
from eglp_dist.errors import DataError

StateDict = Dict[str, torch.Tensor]

_CONTAINERS = ("state_dict", "model", "module")  # mmcv, DeepSpeed exports, whole-model saves
_DDP_PREFIX = "module."


def unwrap_state_dict(obj: Any, origin: str = "<state dict>") -> StateDict:
    """The flat ``{key: tensor}`` inside a loaded checkpoint object: the object itself or
    its ``state_dict``/``model``/``module`` entry; every entry must be a tensor under a
    string key; a ``module.`` prefix on every key (saved from a DDP wrapper) is dropped.
    DataError naming ``origin`` otherwise."""
    for container in _CONTAINERS:
        if isinstance(obj, dict) and isinstance(obj.get(container), dict):
            obj = obj[container]
            break
    if not isinstance(obj, dict) or not obj:
        raise DataError(f"{origin}: not a state dict (found {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise DataError(f"{origin}: entry {bad[0]!r} is not a tensor; not a state dict")
    if all(k.startswith(_DDP_PREFIX) for k in obj):
        return {k[len(_DDP_PREFIX):]: v for k, v in obj.items()}
    return dict(obj)


def read_weight_file(path: os.PathLike | str) -> StateDict:
    """A weight file as a flat ``{key: tensor}`` (see :func:`unwrap_state_dict`), read with
    ``torch.load(weights_only=True)``: nothing in the file is executed. Tensors keep their
    dtype. DataError naming the file if it is missing or is no tensor-only state dict."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such weight file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(f"{path}: cannot be read as a tensor-only weight file ({type(exc).__name__}: "
                        f"{first}); if the file is trusted, re-save its state dict with "
                        f"torch.save(torch.load(path, weights_only=False)['state_dict'])") from None
    return unwrap_state_dict(obj, str(path))


def _fp32(sd: Mapping[str, torch.Tensor]) -> StateDict:
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def resolve_checkpoint_dir(checkpoint: os.PathLike | str) -> Path:
    """The complete ``iter_XXXXXXX`` folder a user path means: that folder itself, a run's
    ``checkpoints/`` folder or its ``latest`` link (-> newest complete one), or a run folder
    holding ``checkpoints/``. DataError naming the path otherwise."""
    p = Path(checkpoint)
    if p.is_symlink() and not p.exists():  # dangling `latest`: scan its folder instead
        found = find_latest(p.parent)
        if found is None:
            raise DataError(f"{p}: dangling link and {p.parent} holds no complete checkpoint")
        return found
    if not p.exists():
        raise DataError(f"{p}: no such checkpoint folder or weight file")
    if not p.is_dir():
        raise DataError(f"{p}: not a folder")
    if (p / COMPLETE).is_file():
        return p.resolve()
    if ITER_RE.match(p.name) or (p / "engines").is_dir():
        raise DataError(f"{p}: no {COMPLETE} marker: the checkpoint was not completely saved "
                        f"(interrupted run?); use an earlier one or the run's checkpoints/ folder")
    for root in (p, p / "checkpoints"):
        found = find_latest(root)
        if found is not None:
            return found
    raise DataError(f"{p}: not a checkpoint folder (no {COMPLETE} marker) and holds no complete "
                    f"iter_XXXXXXX checkpoint")


def load_weights(checkpoint: os.PathLike | str, engine: str = "student") -> StateDict:
    """A plain fp32 state_dict for ``build_segmentor(cfg.model).load_state_dict``.

    ``checkpoint``: a complete checkpoint folder (``iter_XXXXXXX`` with ``COMPLETE``), a run's
    ``checkpoints/`` folder or its ``latest`` link (the newest complete checkpoint), or a
    ``.pt``/``.pth`` state_dict file (:func:`read_weight_file`). From a folder,
    ``engines/<engine>/`` is exported whatever engine wrote it (DDP ``engine.pt`` or a
    DeepSpeed ZeRO folder, ``export_fp32``); a name that is no engine but a plain module of
    the checkpoint (an EMA teacher in ``modules.pt``) is read from there. Needs no process
    group. Errors are DataErrors naming the path and the problem.
    """
    from eglp_dist.runtime.engines import export_fp32

    p = Path(checkpoint)
    if p.is_file():
        return _fp32(read_weight_file(p))
    folder = resolve_checkpoint_dir(p)
    engine_dir = folder / "engines" / engine
    if engine_dir.is_dir():
        try:
            return _fp32(export_fp32(engine_dir))
        except FileNotFoundError as exc:
            raise DataError(str(exc)) from None
    engines = sorted(d.name for d in (folder / "engines").iterdir() if d.is_dir()) \
        if (folder / "engines").is_dir() else []
    modules: List[str] = []
    if (folder / "modules.pt").is_file():
        state = torch.load(folder / "modules.pt", map_location="cpu", weights_only=False)
        if engine in state:
            return _fp32(state[engine])
        modules = sorted(state)
    raise DataError(f"{folder}: no engine {engine!r} (engines: {', '.join(engines) or 'none'}; "
                    f"plain modules: {', '.join(modules) or 'none'})")


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], origin: str) -> None:
    """Strict ``load_state_dict`` whose mismatch is a DataError listing a few keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def few(items: List[str]) -> str:
            return ", ".join(items[:5]) + (f" ... (+{len(items) - 5})" if len(items) > 5 else "")

        parts = [f"{name} {len(items)}: {few(items)}" for name, items in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if items]
        raise DataError(f"{origin}: weights do not fit the config's model ({'; '.join(parts)}); "
                        f"was it trained with another model config?")
    model.load_state_dict(state, strict=True)


__all__ = ["StateDict", "unwrap_state_dict", "read_weight_file", "resolve_checkpoint_dir",
           "load_weights", "load_into"]
