#!/usr/bin/env python
"""Optimizer memory and step time per rank: DDP vs DeepSpeed ZeRO-1 vs ZeRO-2, side by side.

The entry point of ``eglp_dist.runners.bench_engine`` (its docstring says how to use it; ``--help``
lists the flags); the same as ``python -m eglp_dist.runners.bench_engine``."""
from eglp_dist.runners.bench_engine import main

if __name__ == "__main__":
    raise SystemExit(main())
