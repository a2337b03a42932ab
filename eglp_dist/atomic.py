"""Writing files so that a reader never sees half of one: the house rule "nothing
half-written is left behind" in one place.

Every writer (resolved configs, checkpoints, converted weights, eval/score JSON, prediction
PNGs) writes to a hidden temporary beside the target (same file system, so the rename is
atomic; hidden and with a foreign suffix, so no glob such as a server's ``*.png`` picks it
up), renames it onto the target on success and removes it on failure.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: os.PathLike | str) -> Iterator[Path]:
    """Yields the temporary to write; on leaving the block it replaces ``path`` (or is
    deleted, if the block raised). Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: os.PathLike | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def torch_save_atomic(obj: Any, path: os.PathLike | str) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
