"""Progress of a long loop (packing, synthesis, evaluation) that reads well in both places
it is watched: a tqdm bar on a terminal, and in a log file (SLURM, CI, ``make bench > f``)
one plain line per tenth of the work, because carriage-return frames make a log unreadable.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: Optional[int] = None, desc: str = "", unit: str = "it",
             stream=None, lines: int = 10) -> Iterator[T]:
    stream = stream or sys.stderr
    if stream.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit, file=stream)
        return
    start = time.perf_counter()
    every = max(1, (total or 0) // lines) if total else None
    n = 0
    for n, item in enumerate(items, start=1):
        yield item
        if every and (n % every == 0 or n == total):
            rate = n / max(time.perf_counter() - start, 1e-9)
            print(f"{desc}: {n}/{total} {unit} ({rate:.1f} {unit}/s)", file=stream, flush=True)
    if not every:
        print(f"{desc}: {n} {unit}", file=stream, flush=True)
