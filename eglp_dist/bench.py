"""`eglp bench WHAT ...` runs tools/bench_WHAT.py's main(argv) (the tools stay runnable as
plain scripts for people who do not install the package)."""
from __future__ import annotations

import argparse
import importlib
import sys

from eglp_dist.errors import UserError
from eglp_dist.resources import resource_dir

TOOLS = resource_dir("tools")


def run_cli(args: argparse.Namespace) -> int:
    return run_tool(f"bench_{args.what}", args.bench_args)


def ablate_cli(args: argparse.Namespace) -> int:
    """`eglp ablate ...` = tools/ablate.py."""
    tool_args = list(args.tool_args)
    return run_tool("ablate", tool_args[1:] if tool_args[:1] == ["--"] else tool_args)


def run_tool(name: str, argv) -> int:
    return int(tool_module(name).main(argv) or 0)


def tool_module(name: str):
    """tools/NAME.py as a module (the CLI runs its ``main``; tests call its functions)."""
    path = TOOLS / f"{name}.py"
    if not path.is_file():
        raise UserError(f"tool script {path} not found")
    # Imported by name from tools/ on sys.path, not from a file spec: the multi-rank
    # benchmarks spawn processes that unpickle their worker as `bench_WHAT._work`, and
    # spawned children get the parent's sys.path, so they can import it the same way.
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    return importlib.import_module(name)
