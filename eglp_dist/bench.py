"""`eglp bench WHAT ...` and `eglp ablate ...`: the runners' ``main(argv)``
(``eglp_dist/runners/``; ``tools/`` holds their thin script entry points)."""
from __future__ import annotations

import argparse
import importlib


def run_cli(args: argparse.Namespace) -> int:
    return run_runner(f"bench_{args.what}", args.bench_args)


def ablate_cli(args: argparse.Namespace) -> int:
    """`eglp ablate ...` = ``eglp_dist.runners.ablate``."""
    tool_args = list(args.tool_args)
    return run_runner("ablate", tool_args[1:] if tool_args[:1] == ["--"] else tool_args)


def run_runner(name: str, argv) -> int:
    return int(importlib.import_module(f"eglp_dist.runners.{name}").main(argv) or 0)
