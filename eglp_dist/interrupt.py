"""SIGTERM treated like Ctrl-C in the one-process commands (pack, synth, eval, score, ...).

Why: a job scheduler or ``kill`` sends SIGTERM, whose default action ends the process at
once, so no ``finally`` runs and a half-written temporary stays behind forever. Raised as
:class:`KeyboardInterrupt` instead, it unwinds through the same cleanup as Ctrl-C, and the
CLI prints one line instead of a traceback. Worker processes of such a command restore the
default actions (:func:`worker_signals`): their parent decides, and terminates them.
(``eglp train`` handles its stop signals in the loop, every rank alike.)
"""
from __future__ import annotations

import contextlib
import signal
from typing import Iterator, Optional

_received: Optional[str] = None


def _raise(signum, frame):  # noqa: ARG001 - signal handler signature
    global _received
    _received = signal.Signals(signum).name
    raise KeyboardInterrupt(_received)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    global _received
    _received = None
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def received() -> str:
    """The name of the signal that interrupted the command (SIGINT for Ctrl-C)."""
    return _received or "SIGINT"


def worker_signals() -> None:
    """Initializer of a command's worker processes: Ctrl-C goes to the parent only (no
    traceback per worker); SIGTERM, which the parent's cleanup sends, ends them at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
