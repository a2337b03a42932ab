"""`eglp bench WHAT ...` runs tools/bench_WHAT.py's main(argv) (the tools stay runnable as
plain scripts for people who do not install the package)."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from eglp_dist.errors import UserError

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def run_cli(args: argparse.Namespace) -> int:
    path = TOOLS / f"bench_{args.what}.py"
    if not path.is_file():
        raise UserError(f"benchmark script {path} not found")
    spec = importlib.util.spec_from_file_location(f"bench_{args.what}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(args.bench_args) or 0)
