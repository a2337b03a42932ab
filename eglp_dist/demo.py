"""``make demo`` / ``eglp demo``: the whole system on a laptop CPU in about ten minutes.

synthetic Cityscapes (day, labelled) + synthetic ACDC night (target train, whose labels only
the pseudo-label diagnostic reads; val labelled) -> WebDataset shards -> a short source-only
**stage 0** -> from its whole model, ``torchrun --nproc_per_node 2 -m eglp_dist train`` of
the tiny HRDA with source-only, DAFormer/HRDA UDA, the PIG-style night branch (NFNet on 6
labelled synthetic night prompts, fused pseudo-labels) and EGLP (DNIS, DMS + FIS, RCM), with
the same seed, data and iterations -> night mIoU per class of each, the pseudo-label weight
and the final pseudo-label's IoU against the target's ground truth, a per-class chart
(``class_iou.png``, also in TensorBoard) and the TensorBoard command.

Why the warm start: from random weights the pseudo-label path carries no weight at all in
a few hundred iterations (DAFormer's 0.968 threshold assumes a pretrained network); see
``eglp_dist/study.py``. The launch is the real one (torchrun, 2 gloo ranks), so the demo
exercises exactly the code path of a cluster run. Data and finished runs are reused (cached
by their settings; delete ``--out`` to start over).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from eglp_dist.data.offline.synth_tasks import N_VAL, prepare_data, prepare_dg_data  # noqa: F401  (the tests' API)

# Stage 0 and each of the four trainings after it: what keeps the whole demo around ten
# minutes on 2 cores (docs/training.md measures it).
DEMO_PRETRAIN = 1500
DEMO_ITERS = 120
METHODS = ("source_only", "uda", "pig", "eglp")  # configs/demo/tiny_<method>.yaml, in this order
COLUMNS = {"source_only": "source-only", "uda": "UDA", "pig": "PIG-style", "eglp": "EGLP"}


def run_cli(args: argparse.Namespace) -> int:
    from eglp_dist.data.labels import CLASSES
    from eglp_dist.data.offline.synth_render import night_change

    out = Path(args.out)
    t0 = time.perf_counter()
    iters = args.iters or DEMO_ITERS
    pretrain = DEMO_PRETRAIN if args.pretrain is None else args.pretrain
    results, logs = train_all(out, iters, pretrain, t0)
    change = night_change()
    order = sorted(range(len(CLASSES)), key=lambda c: -change[c])  # most changed by night first
    print_table(results, logs, iters, pretrain, change, order)
    chart = write_chart(out, results, change, order)
    print(f"\nper-class chart: {chart}")
    print(f"total {time.perf_counter() - t0:.0f} s.  TensorBoard: tensorboard --logdir {out / 'runs'}")
    return 0


def train_all(out: Path, iters: int, pretrain: int, t0: float):
    """The demo data, stage 0 (when ``pretrain`` > 0) and each method's training, each reused
    when already done; returns (night validation results, training logs) per method."""
    from eglp_dist import study

    data_args = study.eglp_data_args(study.NightData().prepare(out))
    print(f"data ready in {study.NightData().folder(out)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    common = list(data_args)
    if pretrain > 0:
        print(f"\n== stage 0: source-only, {pretrain} iterations, 2 ranks (torchrun, gloo) ==", flush=True)
        stage0 = study.run_cached(study.RunSpec("stage0", "tiny_source_only", tuple(data_args), 0, pretrain),
                                  out, quiet=False)
        common += study.warm_start_args(stage0, "whole") + list(study.WARM_RECIPE)
    results, logs = {}, {}
    for method in METHODS:
        t1 = time.perf_counter()
        print(f"\n== {method}: {iters} iterations, 2 ranks (torchrun, gloo) ==", flush=True)
        run_dir = study.run_cached(study.RunSpec(method, f"tiny_{method}", tuple(common), 0, iters), out,
                                   quiet=False, log_interval=max(iters // 10, 1))
        results[method] = study.last_eval(run_dir)["targets"]["acdc_night"]
        logs[method] = study.train_log(run_dir)
        print(f"{method}: {time.perf_counter() - t1:.0f} s", flush=True)
    return results, logs


def print_table(results, logs, iters: int, pretrain: int, change, order) -> None:
    """Per-class night IoU by designed night change, mIoU, pseudo-label weight and quality."""
    from eglp_dist import study
    from eglp_dist.data.labels import CLASSES

    start = f"from a {pretrain}-iteration source-only stage 0" if pretrain > 0 else "from random weights"
    print(f"\nnight validation (synthetic ACDC night, {N_VAL} images), {iters} iterations each {start}, "
          f"seed 0; classes by their designed night change:")
    print(f"{'class':<15}{'change':>7}" + "".join(f"{COLUMNS[m]:>13}" for m in METHODS))
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for c in order:
        name = CLASSES[c]
        print(f"{name:<15}{change[c]:>7.2f}" + "".join(f"{fmt(results[m]['IoU'][name]):>13}" for m in METHODS))
    print(f"{'mIoU':<22}" + "".join(f"{100 * results[m]['mIoU']:>13.2f}" for m in METHODS))
    second_half = lambda m, key: study.second_half_mean(logs[m], key, iters)  # noqa: E731
    print(f"{'pseudo weight':<22}" + "".join(f"{study.fmt(second_half(m, 'pseudo.confidence'), 3):>13}"
                                            for m in METHODS))
    target_src = lambda m: "fused" if any("pseudo_iou/fused/mIoU" in r for r in logs[m]) else "teacher"  # noqa: E731
    print(f"{'pseudo-label mIoU':<22}" + "".join(
        f"{study.fmt(100 * second_half(m, f'pseudo_iou/{target_src(m)}/mIoU')):>13}" for m in METHODS))
    print(f"{'  + pastes (trained)':<22}" + "".join(
        f"{study.fmt(100 * second_half(m, 'pseudo_iou/final/mIoU')):>13}" for m in METHODS))
    print("(pseudo weight: DAFormer's confidence share; pseudo-label mIoU: the target's label after the recipe's "
          "fusion against its ground truth; + pastes: the label the student is trained on, with the prompt and "
          "rare-class pastes, whose pixels are ground truth; means over the second half of training)")


def write_chart(out: Path, results, change, order) -> Path:
    """The per-class chart as a PNG and as an image in TensorBoard."""
    from torch.utils.tensorboard import SummaryWriter

    from eglp_dist.charts import class_iou_chart
    from eglp_dist.data.labels import CLASSES

    chart = out / "class_iou.png"
    picture = class_iou_chart({COLUMNS[m]: results[m]["IoU"] for m in METHODS}, [CLASSES[c] for c in order],
                              chart, "night IoU per class (synthetic, seed 0), classes by designed night change",
                              [float(change[c]) for c in order])
    with SummaryWriter(str(out / "runs" / "demo_summary")) as writer:
        writer.add_image("demo/class_iou", picture, 0, dataformats="HWC")
    return chart
