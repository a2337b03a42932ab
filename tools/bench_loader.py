#!/usr/bin/env python
"""Loader benchmark: images/s and CPU-seconds per image, side by side, same crop and threads.

The entry point of ``eglp_dist.runners.bench_loader`` (its docstring says how to use it; ``--help``
lists the flags); the same as ``python -m eglp_dist.runners.bench_loader``."""
from eglp_dist.runners.bench_loader import main

if __name__ == "__main__":
    raise SystemExit(main())
