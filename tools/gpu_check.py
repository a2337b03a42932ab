#!/usr/bin/env python
"""The GPU path, proven and measured by one command, with only data it synthesises.

The entry point of ``eglp_dist.runners.gpu_check`` (its docstring says how to use it; ``--help``
lists the flags); the same as ``python -m eglp_dist.runners.gpu_check``."""
from eglp_dist.runners.gpu_check import main

if __name__ == "__main__":
    raise SystemExit(main())
