#!/usr/bin/env python
"""Seconds per training iteration, methods side by side in the same ranks.

The entry point of ``eglp_dist.runners.bench_step`` (its docstring says how to use it; ``--help``
lists the flags); the same as ``python -m eglp_dist.runners.bench_step``."""
from eglp_dist.runners.bench_step import main

if __name__ == "__main__":
    raise SystemExit(main())
