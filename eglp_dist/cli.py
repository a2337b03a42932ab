"""One command line for everything: ``eglp SUBCOMMAND ...`` or ``python -m eglp_dist SUBCOMMAND``.

Arguments of every subcommand are declared here, so ``--help`` is instant and complete;
the work is imported lazily from the module that owns it (``HANDLERS``), so a config error
is reported before torch, DALI or DeepSpeed are even imported.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional

# subcommand -> "module:function"; the function takes the parsed argparse.Namespace and
# returns an exit code.
HANDLERS: Dict[str, str] = {
    "train": "eglp_dist.train:run_cli",
    "eval": "eglp_dist.evaluate:run_cli",
    "predict": "eglp_dist.export:predict_cli",
    "score": "eglp_dist.score:score_cli",
    "pack": "eglp_dist.data.offline.pack:run_cli",
    "synth": "eglp_dist.data.offline.synth:run_cli",
    "convert-mit": "eglp_dist.models.convert_mit:run_cli",
    "bench": "eglp_dist.bench:run_cli",
    "ablate": "eglp_dist.bench:ablate_cli",
    "demo": "eglp_dist.demo:run_cli",
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. trainer.max_iters=100; GROUP=NAME picks "
                        "configs/GROUP/NAME.yaml, e.g. engine=zero2")


def _train_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    # The DeepSpeed launcher appends --local_rank=N to the script's arguments.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _checkpoint_args(p: argparse.ArgumentParser, config_help: str) -> None:
    """What ``eval`` and ``predict`` read: a run's config, a checkpoint, overrides."""
    p.add_argument("config", help=config_help)
    p.add_argument("checkpoint", help="checkpoint folder (e.g. runs/x/checkpoints/latest) or weight file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for train")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _eval_args(p: argparse.ArgumentParser) -> None:
    _checkpoint_args(p, "the run's config file (its model and data.val nodes are used)")
    p.add_argument("--targets", nargs="+", metavar="NAME", default=None,
                   help="evaluate only these targets of data.val (default: every one with shards)")


def _predict_args(p: argparse.ArgumentParser) -> None:
    _checkpoint_args(p, "the run's config file (its model and data.val / data.test nodes are used)")
    p.add_argument("--split", default="val", choices=["val", "test"],
                   help="predict data.val's images (a target of it) or data.test's (default: val)")
    p.add_argument("--target", default=None, metavar="NAME",
                   help="--split val: which target of data.val (needed when several have shards)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", default="trainid", choices=["trainid", "labelid", "color"],
                   help="trainid: 0-18 train ids (ACDC and Dark Zurich servers); labelid: Cityscapes label ids "
                        "(the Cityscapes server); color: the Cityscapes palette, to look at (default: trainid)")


def _score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", required=True, help="folder of prediction PNGs")
    p.add_argument("--gt", required=True, help="folder of label PNGs (trainId or labelId)")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    p.add_argument("--allow-missing", action="store_true",
                   help="score the matched subset when predictions are missing or unreadable "
                        "(default: an error, since that is not the split's mIoU)")


def _pack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="dataset name (see eglp_dist/data/offline/layouts.py)")
    p.add_argument("--root", required=True, help="dataset root in its published layout")
    p.add_argument("--split", required=True)
    p.add_argument("--out", required=True, help="output folder (created atomically)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--image-format", default="auto", choices=["auto", "jpg", "png"],
                   help="auto: lossless png for val/test, jpg for training splits (RGB JPEG sources "
                        "are kept as they are either way)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip-bad", action="store_true", help="skip bad samples and list them in the manifest")
    p.add_argument("--seed", type=int, default=0, help="pack-time shuffle seed")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder (only once the new one is complete)")


def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="layout to write (cityscapes, acdc, gta5, ...)")
    p.add_argument("--out", required=True, help="folder to write the dataset layout into")
    p.add_argument("--n", type=int, default=40, help="images per split")
    p.add_argument("--split", action="append", default=None, help="split(s) to write (default: layout's)")
    p.add_argument("--style", default=None, help="day | night | fog | rain | game (default: dataset's)")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("W", "H"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shift", type=float, default=1.0,
                   help="strength of the night/fog/rain domain shift in [0, 1] (1 = full)")


def _convert_mit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--variant", default=None,
                   help="mit_b0..mit_b5 (SegFormer MiT = timm pvt_v2 with MLP ratio 4; default: inferred "
                        "from the weights)")


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["loader", "step", "engine", "project"])
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of tools/bench_WHAT.py")


def _ablate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("tool_args", nargs=argparse.REMAINDER, help="arguments of tools/ablate.py")


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="folder of the data, shards and runs (default: runs/demo)")
    p.add_argument("--iters", type=int, default=None, help="iterations of each of the four trainings (default: 120)")
    p.add_argument("--pretrain", type=int, default=None,
                   help="iterations of the source-only stage 0 every training starts from (default: 1500; 0: random init)")


SUBCOMMANDS = (  # name, help, the function that adds its arguments
    ("train", "train a model from a config (torchrun / deepspeed / SLURM aware)", _train_args),
    ("eval", "distributed mIoU of a checkpoint on every evaluation target (data.val)", _eval_args),
    ("predict", "write one prediction PNG per image (server formats)", _predict_args),
    ("score", "mIoU of a folder of predictions against a folder of labels", _score_args),
    ("pack", "pack a dataset folder into WebDataset shards + DALI index + manifest", _pack_args),
    ("synth", "write synthetic street scenes in a real dataset layout", _synth_args),
    ("convert-mit", "convert a SegFormer/mmseg mit_b*.pth to timm's pvt_v2 layout", _convert_mit_args),
    ("bench", "benchmarks: loader | step | engine | project (paper-size cost)", _bench_args),
    ("ablate", "method ablations on synthetic data: eglp (day->night, default) or spn (DG); "
               "tools/ablate.py", _ablate_args),
    ("demo", "synthetic day/night data -> shards -> 2-rank training -> mIoU", _demo_args),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eglp", description="Distributed UDA / DG semantic segmentation (EGLP, SPN, HRDA, DAFormer).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_text, add_arguments in SUBCOMMANDS:
        add_arguments(sub.add_parser(name, help=help_text))
    return parser


def _resolve(target: str) -> Callable[[argparse.Namespace], int]:
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise NotImplementedError from exc
        raise
    func = getattr(module, func_name, None)
    if func is None:
        raise NotImplementedError
    return func


def split_local_rank(argv: List[str]):
    """(argv without it, N) for a ``--local_rank=N`` / ``--local-rank N`` anywhere in argv.

    The DeepSpeed launcher passes ``--local_rank=N`` to every process; with ``--module`` it
    puts it right after the module name, *before* our subcommand (``-m eglp_dist
    --local_rank=0 train CONFIG``), where a subcommand parser cannot see it."""
    out, local_rank, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith(("--local_rank=", "--local-rank=")):
            local_rank = int(a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            local_rank, i = int(argv[i + 1]), i + 1
        else:
            out.append(a)
        i += 1
    return out, local_rank


def main(argv: Optional[List[str]] = None) -> int:
    argv, local_rank = split_local_rank(list(sys.argv[1:] if argv is None else argv))
    if argv[:1] == ["ablate"] and argv[1:2] != ["--"]:
        # everything after `ablate` is the tool's; argparse's REMAINDER refuses a first
        # option (`eglp ablate --out ...`) unless `--` ends ours first
        argv = ["ablate", "--", *argv[1:]]
    args = build_parser().parse_args(argv)
    if local_rank is not None and hasattr(args, "local_rank"):
        args.local_rank = local_rank
    try:
        handler = _resolve(HANDLERS[args.command])
    except NotImplementedError:
        print(f"eglp {args.command}: not implemented yet", file=sys.stderr)
        return 3
    from eglp_dist.errors import UserError
    from eglp_dist.interrupt import received, terminate_as_interrupt

    guard = terminate_as_interrupt() if args.command not in EXIT_WITHOUT_FINALIZERS else nullcontext()
    try:
        with guard:
            return int(handler(args) or 0)
    except UserError as exc:
        print(f"eglp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"eglp {args.command}: interrupted ({received()}); partial output removed",
              file=sys.stderr)
        return 130


# Commands that may hold DeepSpeed and DDP engines in one process; they end without
# interpreter finalisation (see eglp_dist.runtime.env.exit_without_finalizers).
EXIT_WITHOUT_FINALIZERS = {"train"}


def entry() -> None:
    """The ``eglp`` console script and ``python -m eglp_dist``."""
    argv = sys.argv[1:]
    code = main(argv)
    command = split_local_rank(argv)[0][:1]
    if command and command[0] in EXIT_WITHOUT_FINALIZERS:
        from eglp_dist.runtime.env import exit_without_finalizers

        exit_without_finalizers(code)
    raise SystemExit(code)
