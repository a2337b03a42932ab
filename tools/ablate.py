#!/usr/bin/env python
"""The method studies on synthetic data (2 CPU ranks, several seeds): eglp (day -> night) or spn (DG).

The entry point of ``eglp_dist.runners.ablate`` (its docstring says how to use it; ``--help``
lists the flags); the same as ``python -m eglp_dist.runners.ablate``."""
from eglp_dist.runners.ablate import main

if __name__ == "__main__":
    raise SystemExit(main())
