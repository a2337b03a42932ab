#!/usr/bin/env python
"""Paper-size cost per iteration, projected (FLOPs and collective bytes of UDA, PIG and EGLP).

The entry point of ``eglp_dist.runners.bench_project`` (its docstring says how to use it; ``--help``
lists the flags); the same as ``python -m eglp_dist.runners.bench_project``."""
from eglp_dist.runners.bench_project import main

if __name__ == "__main__":
    raise SystemExit(main())
