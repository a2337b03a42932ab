"""The loop's per-step control point: stop requests (preemption signals) and bad steps are
decided here, identically on every rank, with one small flag reduction per iteration.

Why one reduction: a signal reaches each rank at its own moment (SLURM signals every task of
a step, but not in the same iteration), so a rank that stopped on its own would leave the
others waiting in the next collective. Instead every rank raises its flag, the flags are
all-reduced (MAX) once after each iteration, and all ranks act on the same step boundary: write
a checkpoint, then leave with :data:`EXIT_PREEMPTED`. The same reduction carries the "this
step was skipped" flag, so the counting of bad steps cannot drift between ranks.

Bad steps are detected where the gradients are whole (``runtime/ddp_engine.py``,
``runtime/zero_engine.py``): under DDP after the gradient all-reduce (a NaN on one rank is
a NaN on every rank), under ZeRO by DeepSpeed's own global gradient-norm check; the
optimizer step is then skipped, and
``trainer.guard.max_bad_steps`` in a row stop the run after a checkpoint of the last good
weights (those of the skipped steps are never applied).
"""
from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Iterator, List, Optional

import torch

from eglp_dist.runtime import comm
from eglp_dist.errors import ConfigError

# sysexits' EX_TEMPFAIL ("try again later"): the job stopped on request after a checkpoint;
# launch/slurm/train.sbatch requeues on it, trainer.resume=auto continues from that step.
EXIT_PREEMPTED = 75

# Set by launch/torchrun.sh and launch/deepspeed.sh (launch/supervise.sh): a node-local folder
# shared by the launch script and the workers it started. Why: torchrun restarts a group whose
# worker exits non-zero, and the DeepSpeed launcher kills the other workers when one does, so a
# worker that stops on request cannot tell the job "stopped, not failed" by its exit code
# there. With the folder, each worker registers its pid once its stop signals are caught (the
# script forwards a signal it receives to those pids only, never to the launcher's own
# processes), reads a request that came before it registered, and, having stopped at a
# checkpoint, leaves ``stopped`` there and exits 0; the script then ends the job with 75.
LAUNCH_DIR_ENV = "EGLP_LAUNCH_DIR"


class StopRequested(Exception):
    """Every rank stopped at the same step boundary on a signal, after a checkpoint."""

    def __init__(self, signame: str, step: int, checkpoint):
        super().__init__(f"stopped by {signame} at iteration {step}; checkpoint {checkpoint}; "
                         f"run again with trainer.resume=auto to continue")
        self.signame, self.step, self.checkpoint = signame, step, checkpoint


class TooManyBadSteps(RuntimeError):
    """``max_bad_steps`` non-finite steps in a row; the last good state was checkpointed."""


class RankLost(RuntimeError):
    """A peer closed its connection, or a collective or this rank's data got no answer within
    ``dist.step_timeout_s``."""


# what gloo and NCCL say when a peer's process is gone (its sockets closed by the kernel) ...
_LEFT = ("connection closed", "connection reset", "broken pipe")
# ... and when a peer or this rank's data stops answering while alive
_TIMED_OUT = ("timed out", "timeout", "no batch for step")


def as_rank_lost(exc: BaseException, it: int, phase: str, dist_cfg, rank: int = 0,
                 world: int = 1) -> Optional[RankLost]:
    """A lost peer or a timeout of the loop as an error naming the iteration and what waited
    (None: neither). A closed connection arrives at once, not after the timeout, so it is said
    as such; with 2 ranks the one that left can only be the other."""
    text = str(exc).strip()
    low = text.lower()
    first = text.splitlines()[0] if text else type(exc).__name__
    if any(k in low for k in _LEFT):
        who = f"rank {1 - rank}" if world == 2 else "another rank"
        return RankLost(f"iteration {it}: {who} left (connection closed) in {phase}: its process "
                        f"ended or was killed; its own log says why ({first})")
    if any(k in low for k in _TIMED_OUT):
        return RankLost(f"iteration {it}: no answer within {dist_cfg.step_timeout_s} s (dist.step_timeout_s) in "
                        f"{phase}: another rank is stopped, stuck in its data loading, or gone ({first})")
    return None


def launch_dir() -> Optional[Path]:
    """The launch script's folder (:data:`LAUNCH_DIR_ENV`), or None (no script in front, or
    its folder gone)."""
    value = os.environ.get(LAUNCH_DIR_ENV)
    return Path(value) if value and Path(value).is_dir() else None


def stopped_for_launcher(message: str) -> int:
    """The exit code of a worker that stopped on request: with a launch script in front, the
    ``stopped`` mark and 0 (the script exits 75); alone (srun's tasks, a bare launcher), 75."""
    folder = launch_dir()
    if folder is None:
        return EXIT_PREEMPTED
    (folder / "stopped").write_text(message + "\n")
    return 0


@contextlib.contextmanager
def step_timeouts(dist_cfg) -> Iterator[None]:
    """Training collectives time out after ``dist.step_timeout_s``; start-up, checkpoints and
    evaluations keep ``dist.timeout_s`` (:func:`startup_timeout`)."""
    comm.set_timeout(dist_cfg.step_timeout_s)
    try:
        yield
    finally:
        comm.set_timeout(dist_cfg.timeout_s)


@contextlib.contextmanager
def startup_timeout(dist_cfg) -> Iterator[None]:
    comm.set_timeout(dist_cfg.timeout_s)
    try:
        yield
    finally:
        comm.set_timeout(dist_cfg.step_timeout_s)


def signal_numbers(names: List[str]) -> List[int]:
    out = []
    for name in names:
        try:
            out.append(int(signal.Signals[name]))
        except KeyError:
            raise ConfigError(f"trainer.guard.stop_signals: {name!r} is not a signal name "
                              f"(e.g. SIGTERM, SIGUSR1)") from None
    return out


class ControlPoint:
    """Installed for the life of the loop (a context manager); ``after_step`` is the control
    point, ``stop_signal`` what a rank saw."""

    def __init__(self, guard_cfg, device: torch.device):
        self.cfg = guard_cfg
        self.device = device
        self.signums = signal_numbers(list(guard_cfg.stop_signals))
        self.seen: Optional[int] = None  # the first stop signal this rank received
        self.bad_in_a_row = 0
        self.bad_total = 0
        self._previous = {}
        self._registered: Optional[Path] = None  # this worker's entry in the launch folder

    # -- signals -----------------------------------------------------------------------
    def _on_signal(self, signum, frame):  # noqa: ARG002 - signal handler signature
        if self.seen is None:
            self.seen = signum

    def __enter__(self) -> "ControlPoint":
        for s in self.signums:
            self._previous[s] = signal.signal(s, self._on_signal)
        self._register()
        return self

    def __exit__(self, *exc) -> None:
        if self._registered is not None:  # past the loop a signal would find the default action
            self._registered.unlink(missing_ok=True)
            self._registered = None
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()

    def _register(self) -> None:
        """Tell the launch script this pid may be signalled now, then take a request it got
        before (registration first: a request is either seen here or forwarded)."""
        folder = launch_dir()
        if folder is None:
            return
        self._registered = folder / f"worker.{os.getpid()}"
        self._registered.touch()
        request = folder / "requested"
        if request.is_file() and self.seen is None:
            name = request.read_text().strip()
            self.seen = int(signal.Signals[name]) if name in signal.Signals.__members__ else int(signal.SIGTERM)

    # -- the per-step decision -----------------------------------------------------------
    def after_step(self, skipped: bool) -> "Decision":
        """One all-reduce (MAX) of [stop signal number, step skipped]; the same decision on
        every rank."""
        flags = torch.tensor([self.seen or 0, int(skipped)], dtype=torch.int64, device=self.device)
        signum, any_skipped = comm.all_reduce_max(flags).tolist()
        if any_skipped:
            self.bad_in_a_row += 1
            self.bad_total += 1
        else:
            self.bad_in_a_row = 0
        stop = signal.Signals(signum).name if signum else None
        too_many = self.bad_in_a_row >= self.cfg.max_bad_steps
        return Decision(stop=stop, skipped=bool(any_skipped), too_many_bad=too_many)

    def state_dict(self) -> dict:
        return {"bad_in_a_row": self.bad_in_a_row, "bad_total": self.bad_total}

    def load_state_dict(self, state: dict) -> None:
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))
        self.bad_total = int(state.get("bad_total", 0))

    def inject_faults(self, it: int, is_main: bool, method) -> None:
        """The guard's test seam (``trainer.guard.inject_nan_steps``): on rank 0, the student's
        next backward of iteration ``it`` (1-based, as logged) gets a NaN loss. The engine
        itself carries no test code: its ``backward`` is wrapped for that one call."""
        if is_main and it in self.cfg.inject_nan_steps:
            poison_next_backward(method.student)


def poison_next_backward(engine) -> None:
    backward = engine.backward

    def poisoned(loss):
        engine.backward = backward  # once
        backward(loss * float("nan"))
    engine.backward = poisoned


class Decision:
    __slots__ = ("stop", "skipped", "too_many_bad")

    def __init__(self, stop: Optional[str], skipped: bool, too_many_bad: bool):
        self.stop, self.skipped, self.too_many_bad = stop, skipped, too_many_bad
