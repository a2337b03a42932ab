"""The training loop. Its body arrives with the training-engine issue; until then `eglp train`
validates the config (so errors surface now) and says plainly that it cannot train yet."""
from __future__ import annotations

import argparse
import sys

from eglp_dist.config import load_config


def run_cli(args: argparse.Namespace) -> int:
    load_config(args.config, args.overrides)
    print("eglp train: config is valid, but the training loop is not implemented yet", file=sys.stderr)
    return 3
