"""The run folder ``run.out_dir/run.name``: who may write into it, and which config its
checkpoints belong to.

Two mistakes must not pass silently. Two jobs on one folder (a resubmitted job while the
first still runs, two users with the same ``run.name``) would resume each other's
checkpoints and interleave their writes: a lock file, held for the run's lifetime, names the
holder (host, pid) to the second job; a lock whose process is gone (same host) is taken over
with a warning. And a rerun of a config with changed settings would "resume" checkpoints
trained with other settings (and might even say "run already complete" without training):
before resuming, the checkpoint's resolved config is compared with this run's in every key
that changes the result (:data:`RESULT_NEUTRAL` lists those that do not).
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from eglp_dist.atomic import write_text_atomic
from eglp_dist.config_merge import flat_items
from eglp_dist.errors import ConfigError, UserError

LOCK = "LOCK"
ATTEMPTS = "attempts"

# Keys (or whole nodes) that do not change what is trained: how long, how often to log,
# evaluate and save, where the run folder lies, how data is read (not which data), the
# evaluation sets, measurements that never touch the loss (``method.diagnostics``: tested
# bit for bit). ``trainer.max_iters`` may change to extend or shorten a run: the poly
# schedule is then computed from the new length from the resumed step on, and the log says so.
RESULT_NEUTRAL = ("run.out_dir", "trainer.max_iters", "trainer.log_interval", "trainer.eval_interval",
                  "trainer.ckpt_interval", "trainer.keep_last", "trainer.image_interval",
                  "trainer.resume", "trainer.guard.stop_signals", "trainer.guard.max_bad_steps", "dist",
                  "data.num_threads", "data.prefetch", "data.val",
                  "data.test", "method.diagnostics")


class RunFolderBusy(UserError):
    """Another live job holds the run folder."""


def run_dir_of(cfg) -> Path:
    return Path(cfg.run.out_dir) / cfg.run.name


# ----------------------------------------------------------------------------- the lock

def _holder_alive(holder: Mapping[str, Any]) -> Optional[bool]:
    """True/False where this host can tell (the holder ran here), None where it cannot."""
    if holder.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


class RunLock:
    """``run_dir/LOCK`` created exclusively (``O_EXCL``, atomic on local and NFSv3+ file
    systems), holding {host, pid, started}; removed by :meth:`release` (only if still ours)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self.held = False
        self.created_folder = not self.path.parent.exists()

    def acquire(self) -> Optional[str]:
        """Takes the lock; returns a warning text if a dead holder's lock was taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                alive = _holder_alive(holder)
                if alive is False or holder.get("unreadable"):
                    note = (f"{self.path.parent}: taking over the lock of a job that is gone "
                            f"({_describe(holder)})")
                    self.path.unlink(missing_ok=True)
                    continue
                hint = ("" if alive else f"; if that job is dead, delete {self.path}")
                raise RunFolderBusy(f"run folder {self.path.parent} is in use by another job "
                                    f"({_describe(holder)}); choose another run.name or wait{hint}")
            with os.fdopen(fd, "w") as f:
                json.dump(self.mine, f)
            self.held = True
            return note
        raise RunFolderBusy(f"{self.path}: could not take the run folder's lock")

    def _read(self) -> Dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            # a lock half-written by a process killed between create and write
            age = time.time() - self.path.stat().st_mtime if self.path.exists() else 1e9
            return {"unreadable": age > 60, "host": "?", "pid": "?"}

    def release(self) -> None:
        holder = self._read() if self.held else {}
        if holder.get("pid") == self.mine["pid"] and holder.get("host") == self.mine["host"]:
            self.path.unlink(missing_ok=True)
            if self.created_folder:  # a run that stopped before writing anything leaves nothing
                try:
                    self.path.parent.rmdir()
                except OSError:
                    pass
        self.held = False


def _describe(holder: Mapping[str, Any]) -> str:
    started = holder.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(
        started, (int, float)) else ""
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{when}"


# ------------------------------------------------------------------- config of a resume

def _neutral(key: str) -> bool:
    return any(key == n or key.startswith(n + ".") for n in RESULT_NEUTRAL)


def config_differences(trained: Mapping[str, Any], now: Mapping[str, Any]) -> List[str]:
    """'key: old -> new' for every result-changing key in which two plain configs differ."""
    a, b = dict(flat_items(trained)), dict(flat_items(now))
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        if _neutral(key):
            continue
        old, new = a.get(key, missing), b.get(key, missing)
        if old != new and not same_path(old, new):
            show = lambda v: "(absent)" if v is missing else repr(v)  # noqa: E731
            out.append(f"{key}: {show(old)} -> {show(new)}")
    return out


def same_path(a: Any, b: Any) -> bool:
    """Two strings that name the same existing file or folder (``runs/x`` and ``/abs/runs/x``,
    or through a symlink) are one setting: a run resumed from another working directory, or a
    study folder given another way, continues instead of refusing. A path that does not exist
    from here still counts as different."""
    if not (isinstance(a, str) and isinstance(b, str) and a and b):
        return False
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def check_resume_config(checkpoint: Path, trained: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    diffs = config_differences(trained, now)
    if diffs:
        listing = "\n  ".join(diffs)
        raise ConfigError(
            f"{checkpoint} was trained with another config; resuming it would mix two runs. "
            f"Differing keys (checkpoint -> now):\n  {listing}\n"
            f"Either give the new settings another run.name (or run.out_dir), or start them with "
            f"trainer.resume=never in a new run folder; to continue this run, drop these changes.")


def check_fresh_start(ckpt_root: Path, has_checkpoint: bool) -> None:
    """``trainer.resume=never`` must not train over (and prune) another run's checkpoints."""
    if has_checkpoint:
        raise ConfigError(f"trainer.resume=never, but {ckpt_root} already holds checkpoints of a "
                          f"run; a fresh start would overwrite them. Choose another run.name or "
                          f"run.out_dir (or delete that folder yourself).")


def record_attempt(run_dir: Path, config_yaml: str) -> Path:
    """``config.yaml`` is this attempt's resolved config; ``attempts/NNN.yaml`` keeps every
    attempt's, so a folder resumed with, e.g., a longer max_iters still shows its history."""
    folder = run_dir / ATTEMPTS
    folder.mkdir(parents=True, exist_ok=True)
    n = 1 + sum(1 for p in folder.glob("*.yaml"))
    path = folder / f"{n:03d}.yaml"
    write_text_atomic(path, config_yaml)
    write_text_atomic(run_dir / "config.yaml", config_yaml)
    return path
