"""Atomic, resumable checkpoints of a whole run: every engine (in its own format), the plain
modules beside them (EMA teachers), run-wide state (iteration, method state) and per-rank
state (RNG streams, data-stream positions).

Layout of ``<run>/checkpoints/``::

    iter_0004000/
        engines/<name>/...      engine.pt (DDP) or DeepSpeed's zero/ folder (each rank its partition)
        modules.pt              plain modules' state_dicts (rank 0; identical on all ranks)
        state.pt                run-wide state (rank 0)
        rank_00000.pt ...       per-rank state (every rank)
        COMPLETE                written last: a folder without it is never loaded; holds the step
                                and every file's size, so a truncated file is found before loading
    latest -> iter_0004000      symlink, replaced atomically

Every rank takes part. All write into ``.tmp-iter_XXXXXXX``; after a barrier rank 0 marks it
complete, renames it into place, repoints ``latest`` and prunes to ``keep_last``. A crash at
any point leaves either the previous checkpoint or the new one, never half of one.
The folder must be on a file system all ranks share (as for any multi-node run).

``trainer.resume=auto`` takes the newest complete checkpoint whose files all have the sizes
its ``COMPLETE`` lists; a damaged one (a file truncated or lost after the save: a full disk,
a copy cut short) is passed over for the previous one, with a warning naming both. Sizes, not
checksums: checking them reads no data, and truncation is how checkpoints break in practice.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Protocol, runtime_checkable

import numpy as np
import torch

from eglp_dist.atomic import torch_save_atomic
from eglp_dist.runtime import comm
from eglp_dist.errors import DataError
from eglp_dist.notices import warning



@runtime_checkable
class Stateful(Protocol):
    """What a checkpoint holds beside the engines (EMA teachers, memory banks): anything
    that gives and takes its state; identical on every rank (saved by rank 0)."""

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> Any: ...


COMPLETE = "COMPLETE"  # marker file, written last
LATEST = "latest"
ITER_RE = re.compile(r"^iter_(\d+)$")  # a checkpoint folder's name (checkpoint_name); group 1: step


def capture_rng() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def save_checkpoint(ckpt_root: os.PathLike | str, step: int, engines: Mapping[str, Any],
                    modules: Mapping[str, Stateful], state: Mapping[str, Any],
                    rank_state: Mapping[str, Any], keep_last: int = 3) -> Path:
    """Collective: call on every rank with the same `step`. Returns the final folder."""
    root = Path(ckpt_root)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}"
    if comm.rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        tmp.mkdir()
    comm.barrier()
    for name, engine in engines.items():
        engine.save(tmp / "engines" / name)
    if comm.rank() == 0:
        torch_save_atomic({k: m.state_dict() for k, m in modules.items()}, tmp / "modules.pt")
        torch_save_atomic(dict(state, step=step, world_size=comm.world_size()), tmp / "state.pt")
    torch_save_atomic(dict(rank_state, rng=capture_rng()), tmp / f"rank_{comm.rank():05d}.pt")
    comm.barrier()
    if comm.rank() == 0:
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / COMPLETE).write_text(json.dumps({"step": step, "files": files}, indent=0) + "\n")
        if final.exists():  # re-save of the same step (e.g. final == last periodic)
            shutil.rmtree(final)
        os.replace(tmp, final)
        link_tmp = root / f".{LATEST}.tmp"
        if link_tmp.is_symlink() or link_tmp.exists():
            link_tmp.unlink()
        os.symlink(final.name, link_tmp)
        os.replace(link_tmp, root / LATEST)
        _prune(root, keep_last)
    comm.barrier()
    return final


def _complete_checkpoints(root: Path):
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = ITER_RE.match(p.name)
            if m and p.is_dir() and (p / COMPLETE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def _prune(root: Path, keep_last: int) -> None:
    for _, path in _complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def damage(path: Path) -> Optional[str]:
    """What is wrong with a complete checkpoint's files (None: every file listed in its
    COMPLETE is there with its size; checkpoints written before sizes were kept pass)."""
    try:
        listed = json.loads((path / COMPLETE).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None  # the old marker (just the step): nothing to compare
    for rel, size in (listed or {}).items():
        f = path / rel
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} of its {size} bytes"
    return None


def find_latest(ckpt_root: os.PathLike | str) -> Optional[Path]:
    """The newest complete, undamaged checkpoint (``latest`` first, then a scan); a damaged
    newer one is skipped with a warning naming it, what is wrong, and the one taken; if all
    are damaged, DataError naming the newest."""
    root = Path(ckpt_root)
    link = root / LATEST
    candidates = [p for _, p in reversed(_complete_checkpoints(root))]
    if link.exists() and (link.resolve() / COMPLETE).is_file() and link.resolve() in candidates:
        candidates.remove(link.resolve())
        candidates.insert(0, link.resolve())
    skipped = []
    for path in candidates:
        problem = damage(path)
        if problem is None:
            if skipped:
                warning(f"checkpoint {skipped[0][0]} is damaged ({skipped[0][1]}); resuming from "
                        f"{path} instead" + (f" ({len(skipped) - 1} more damaged ones skipped)"
                                             if len(skipped) > 1 else ""))
            return path.resolve()
        skipped.append((path, problem))
    if skipped:  # never a silent restart from scratch over a run's damaged checkpoints
        raise DataError(f"checkpoint {skipped[0][0]} is damaged ({skipped[0][1]}) and no older complete "
                        f"checkpoint is intact; restore it, or move {root} away to start afresh")
    return None


def resolve_checkpoint(path: os.PathLike | str) -> Path:
    """A user-given checkpoint path (a folder, `latest`, or a run's checkpoints folder);
    a named folder that is damaged is an error naming the file."""
    p = Path(path)
    if (p / COMPLETE).is_file():
        problem = damage(p)
        if problem is not None:
            raise DataError(f"checkpoint {p} is damaged: {problem}")
        return p.resolve()
    latest = find_latest(p)
    if latest is None:
        raise FileNotFoundError(f"{p}: not a complete checkpoint folder (no {COMPLETE} marker) "
                                f"and holds no complete checkpoint")
    return latest


def read_file(path: os.PathLike | str, map_location="cpu") -> Any:
    """``torch.load`` of one checkpoint file; a missing, truncated or corrupt file raises
    DataError naming it (torch's own errors, ``EOFError`` or ``OSError: [Errno 22]``, do not)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint file missing")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - unpickling and zip errors come in many types
        raise DataError(f"{path}: checkpoint file is truncated or corrupt "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def read_run_state(path: os.PathLike | str) -> Dict[str, Any]:
    """The run-wide state of a checkpoint (step, method name, resolved config)."""
    return read_file(Path(path) / "state.pt")


def saved_world_size(path: Path, state: Mapping[str, Any]) -> int:
    return int(state.get("world_size") or len(list(path.glob("rank_*.pt"))))


def load_checkpoint(path: os.PathLike | str, engines: Mapping[str, Any],
                    modules: Mapping[str, Stateful], restore_rng_state: bool = True):
    """Collective. Loads engines and modules in place; returns (state, rank_state).

    On another world size, a rank the checkpoint has no state for gets only rank 0's data
    stream positions (``rank_state["fresh"] = True``, no ``method``/``rng``): its random
    streams are the caller's to derive from (seed, rank, step), never a copy of rank 0's.
    A ZeRO engine's optimizer state is re-partitioned for this world size (``DeepSpeedEngine.load``)."""
    path = resolve_checkpoint(path)
    state = read_run_state(path)
    for name, engine in engines.items():
        try:
            engine.load(path / "engines" / name)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - DeepSpeed's loader raises many types
            raise DataError(f"{path / 'engines' / name}: cannot load engine {name!r} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    module_states = read_file(path / "modules.pt")
    for name, module in modules.items():
        module.load_state_dict(module_states[name])
    rank_file = path / f"rank_{comm.rank():05d}.pt"
    if rank_file.is_file():
        rank_state = read_file(rank_file)
        if restore_rng_state:
            restore_rng(rank_state["rng"])
        return state, rank_state
    first = read_file(path / "rank_00000.pt")
    return state, {"streams": first["streams"], "fresh": True}
