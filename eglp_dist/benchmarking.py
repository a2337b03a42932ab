"""What every benchmark of the project shares: rows compared side by side, and collectives
accounted for.

A benchmark that runs one variant after another on a shared machine measures the
neighbours: any change of load between rows goes straight into the ratio. So every
benchmark builds all its rows in the same processes and interleaves them, one call of each
row per round with the order rotating every round (A B C, B C A, C A B, ...), and reports
the median of the *paired* per-round ratios to a reference row beside each row's own median
and range. A load change then slows both sides of a pair alike. Wall and CPU seconds are
kept per call (CPU time counts every thread of the process: gloo's and the intra-op pool's),
and the one-minute load average is read at the start and the end.

``CollectiveCounter`` counts the collectives a piece of code issues, with their bytes and
the code that asked for them, by wrapping ``torch.distributed``'s functions (what our
``runtime.comm``, DDP's buffer path and DeepSpeed call) and DDP's gradient buckets through a
communication hook (DDP's reducer calls the process group from C++, below any Python
wrapper). Benchmarks only: nothing here runs in training.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch

# torch.distributed functions that move data between ranks (an object collective pickles
# and issues tensor collectives underneath, each counted)
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all_single", "reduce", "barrier", "all_reduce_coalesced",
               "_broadcast_coalesced")


def rotated(names: Sequence[str], round_: int) -> List[str]:
    k = round_ % len(names)
    return list(names[k:]) + list(names[:k])


def load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not every platform has one
        return None


def interleave(rows: Dict[str, Callable[[int], None]], warmup: int, rounds: int,
               sync: Callable[[], None] = lambda: None,
               on_timed: Callable[[], None] = lambda: None,
               align: Callable[[], None] = lambda: None) -> Dict[str, Dict[str, List[float]]]:
    """Call each row's ``fn(round)`` once per round, the order rotating; return per row the
    wall and CPU seconds of every timed round (``{"wall": [...], "cpu": [...]}``). ``sync``
    waits for queued device work (``torch.cuda.synchronize``) around each timed call;
    ``align`` runs untimed before each call (a barrier: every rank starts the call together,
    so a multi-rank call's time is the slowest rank's, and the ranks' skew from earlier rows
    is not charged to it); ``on_timed`` is called once when the warm-up rounds are done (to
    reset side counters)."""
    names = list(rows)
    times = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(warmup + rounds):
        if r == warmup:
            on_timed()
        for name in rotated(names, r):
            sync()
            align()
            t0, c0 = time.perf_counter(), time.process_time()
            rows[name](r)
            sync()
            if r >= warmup:
                times[name]["wall"].append(time.perf_counter() - t0)
                times[name]["cpu"].append(time.process_time() - c0)
    return times


def spread(values: Sequence[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def paired_ratios(times: Dict[str, Dict[str, List[float]]], ref: str, key: str = "wall"
                  ) -> Dict[str, Dict[str, float]]:
    """Per row, the spread of its per-round time over the reference row's same-round time."""
    base = times[ref][key]
    return {n: spread([a / b for a, b in zip(t[key], base)]) for n, t in times.items()}


def summarise(times: Dict[str, Dict[str, List[float]]], ref: str) -> Dict[str, Dict[str, dict]]:
    """Per row: wall and CPU spread and the paired wall ratio to ``ref``."""
    ratio = paired_ratios(times, ref)
    return {n: {"wall": spread(t["wall"]), "cpu": spread(t["cpu"]), "ratio": ratio[n]} for n, t in times.items()}


def write_json(path: Optional[str], payload: dict) -> None:
    """A benchmark's raw figures (``--json PATH``), with the folder made; nothing if no path."""
    if path:
        import json
        from pathlib import Path

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1))


def format_spread(s: Dict[str, float], digits: int = 3) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


class CollectiveCounter:
    """Counts collectives issued while active: ``(purpose, kind, dtype) -> [calls, bytes]``.

    The purpose is the caller: DDP's gradient buckets are ``gradients <engine>`` (the hook
    knows its engine), anything else the innermost ``eglp_dist`` frame that asked
    (``methods/eglp.py:pseudo_label_step``), or the first frame outside torch (DDP's and
    DeepSpeed's own calls name themselves). Install with :meth:`patch` (once per process);
    count with ``with counter.counting(): ...``.
    """

    def __init__(self):
        self.active = False
        self.counts: Dict[tuple, List[int]] = {}
        self._saved: Dict[str, Callable] = {}

    def patch(self) -> "CollectiveCounter":
        import torch.distributed as tdist

        for name in COLLECTIVES:
            fn = getattr(tdist, name, None)
            if fn is not None and name not in self._saved:
                self._saved[name] = fn
                setattr(tdist, name, self._wrap(name, fn))
        return self

    def unpatch(self) -> None:
        import torch.distributed as tdist

        for name, fn in self._saved.items():
            setattr(tdist, name, fn)
        self._saved.clear()

    def ddp_hook(self, ddp_module, engine: str) -> None:
        """Count ``ddp_module``'s gradient buckets (DDP's default all-reduce, unchanged).
        DDP accepts a hook only before its first backward."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            self.record(f"gradients {engine}", "all_reduce (DDP bucket)", [bucket.buffer()])
            active, self.active = self.active, False  # the default hook's own all_reduce: counted above
            try:
                return allreduce_hook(state, bucket)
            finally:
                self.active = active

        ddp_module.register_comm_hook(None, hook)

    @contextlib.contextmanager
    def counting(self) -> Iterator["CollectiveCounter"]:
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def record(self, purpose: str, kind: str, tensors: Sequence) -> None:
        if not self.active:
            return
        flat = [t for t in _tensors(tensors)]
        dtypes = ",".join(sorted({str(t.dtype).replace("torch.", "") for t in flat})) or "-"
        entry = self.counts.setdefault((purpose, kind, dtypes), [0, 0])
        entry[0] += 1
        entry[1] += sum(t.numel() * t.element_size() for t in flat)

    def _wrap(self, name: str, fn: Callable) -> Callable:
        def counted(*args, **kwargs):
            if self.active:
                self.record(_caller(), name, list(args) + list(kwargs.values()))
            return fn(*args, **kwargs)
        counted.__wrapped__ = fn
        return counted

    def table(self, per: int = 1) -> List[dict]:
        """Rows sorted by purpose: calls and bytes per ``per`` (e.g. per iteration)."""
        return [{"purpose": p, "collective": k, "dtype": d, "calls": c / per, "bytes": b / per}
                for (p, k, d), (c, b) in sorted(self.counts.items())]


def _tensors(values) -> Iterator[torch.Tensor]:
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


def _caller() -> str:
    """The code that issued a collective: the innermost frame of this package (not this
    module, not the runtime's collective wrappers comm and parts), else the first one
    outside torch."""
    frame = sys._getframe(2)
    outside_torch = None
    while frame is not None:
        path = frame.f_code.co_filename.replace(os.sep, "/")
        if "/eglp_dist/" in path and not path.endswith(("/benchmarking.py", "/runtime/comm.py", "/runtime/parts.py")):
            return f"{path.rsplit('/eglp_dist/', 1)[1]}:{frame.f_code.co_name}"
        if outside_torch is None and "/torch/" not in path:
            outside_torch = f"{os.path.basename(path)}:{frame.f_code.co_name}"
        frame = frame.f_back
    return outside_torch or "torch"
