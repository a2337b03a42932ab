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


def write_bytes_atomic(path: os.PathLike | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def torch_save_atomic(obj: Any, path: os.PathLike | str) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_tag() -> str:
    """host-pid of this process: temporaries name their owner, so a later run can tell a
    dead owner's leftovers (same host, pid gone) from a live job's (another host sharing
    the file system is never judged)."""
    import socket

    host = socket.gethostname().replace("-", "_") or "host"
    return f"{host}-{os.getpid()}"


def remove_stale_temp_dirs(path: os.PathLike | str) -> list:
    """Temporaries of ``path`` left by processes that died without cleaning up (SIGKILL,
    power loss): removed, so they cannot pile up beside the target. Returns what was removed."""
    import shutil

    path = Path(path)
    removed = []
    prefixes = (f".{path.name}.tmp-", f".{path.name}.old-")
    if not path.parent.is_dir():
        return removed
    for p in path.parent.iterdir():
        prefix = next((x for x in prefixes if p.name.startswith(x)), None)
        if prefix is None:
            continue
        host, _, pid = p.name[len(prefix):].rpartition("-")
        if host == _owner_tag().rpartition("-")[0] and pid.isdigit() \
                and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_dir(path: os.PathLike | str) -> Iterator[Path]:
    """Yields a hidden temporary folder beside ``path``; on leaving the block it becomes
    ``path`` (an existing ``path`` is swapped out only then and deleted after), or it is
    deleted, if the block raised (an interrupt included). Whether an existing ``path`` may
    be replaced at all is the caller's decision, taken before entering."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(path)
    tmp = path.parent / f".{path.name}.tmp-{_owner_tag()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = path.parent / f".{path.name}.old-{_owner_tag()}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
