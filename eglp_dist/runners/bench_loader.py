"""Loader benchmark: images/s and CPU-seconds per image, side by side, same crop and threads.

    python tools/bench_loader.py [--n 64] [--size 1024 512] [--crop 512 512] [--threads 2]
    eglp bench loader [same arguments]

(a) ``folder``: the HRDA/MMSeg way -- a torch DataLoader (``num_workers`` = threads) over the
    PNG folders of the dataset: PIL decode of image and label, Resize(img_scale, ratio_range)
    of the whole image (bilinear) and label (nearest), RandomCrop with cat_max_ratio,
    RandomFlip, Normalize, Pad, to tensors. Written here with PIL + numpy, as HRDA would
    with ``imdecode_backend='pillow'``.
(b) ``pil``: our TrainStream, PIL back-end (shards, PIL threads).
(c) ``dali``: our TrainStream, DALI backend (``mixed`` decode on a GPU, ``cpu`` here).

Each timing runs in its own subprocess (no shared warm caches or threads); after warm-up
batches, a fixed number of batches is timed. The loaders take turns: ``--repeats`` rounds,
each running every loader once, the order rotating (``eglp_dist.benchmarking``), so a change
of machine load between rounds hits every loader alike; the table gives each loader's median
[min-max] over the rounds and the median of the **paired** per-round ratios to (a). CPU time
is that of the process and all its children (DataLoader workers included), so CPU-s/image is
comparable across designs. Nothing here asserts a speed: the table is the result.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LOADERS = ("folder", "pil", "dali")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/eglp_bench_loader", help="data folder (reused)")
    p.add_argument("--n", type=int, default=64, help="synthetic Cityscapes train images")
    p.add_argument("--size", type=int, nargs=2, default=[1024, 512], metavar=("W", "H"))
    p.add_argument("--img-scale", type=int, nargs=2, default=[1024, 512], metavar=("LONG", "SHORT"))
    p.add_argument("--ratio-range", type=float, nargs=2, default=[0.5, 2.0])
    p.add_argument("--crop", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    p.add_argument("--threads", type=int, default=2, help="threads (ours) = workers (DataLoader)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--batches", type=int, default=40, help="timed batches per loader")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    p.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=LOADERS)
    p.add_argument("--repeats", type=int, default=3, help="rounds of every loader, order rotating")
    p.add_argument("--resample", default=None, choices=["mmcv", "antialias"],
                   help="data.resample of ours (default: the config's, mmcv)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one loader
    return p.parse_args(argv)


# ------------------------------------------------------------------------- (a) folder loader
class FolderDataset:
    """MMSeg-style training pipeline over Cityscapes PNG folders (PIL + numpy)."""

    MEAN = (123.675, 116.28, 103.53)
    STD = (58.395, 57.12, 57.375)

    def __init__(self, root: str, args):
        from eglp_dist.data.offline.layouts import get_layout

        self.pairs = get_layout("cityscapes").find(Path(root), "train")
        self.args = args

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        import numpy as np
        import torch
        from PIL import Image

        a, pair = self.args, self.pairs[i]
        rng = np.random.default_rng()
        img = Image.open(pair.image).convert("RGB")
        seg = Image.open(pair.label)
        seg.load()
        w, h = img.size
        r = rng.uniform(*a.ratio_range)
        long_, short = max(a.img_scale) * r, min(a.img_scale) * r
        sf = min(long_ / max(h, w), short / min(h, w))
        nw, nh = int(w * sf + 0.5), int(h * sf + 0.5)
        img = np.asarray(img.resize((nw, nh), Image.BILINEAR))
        seg = np.asarray(seg.resize((nw, nh), Image.NEAREST))
        ch, cw = a.crop
        for _ in range(10):  # RandomCrop(cat_max_ratio=0.75)
            y = rng.integers(0, max(nh - ch, 0) + 1)
            x = rng.integers(0, max(nw - cw, 0) + 1)
            cnt = np.bincount(seg[y:y + ch, x:x + cw].ravel(), minlength=256)
            cnt[255] = 0
            cnt = cnt[cnt > 0]
            if len(cnt) > 1 and cnt.max() / cnt.sum() < 0.75:
                break
        img, seg = img[y:y + ch, x:x + cw], seg[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            img, seg = img[:, ::-1], seg[:, ::-1]
        img = (img.astype(np.float32) - self.MEAN) / self.STD
        out_img = np.zeros((ch, cw, 3), np.float32)
        out_seg = np.full((ch, cw), 255, np.uint8)
        out_img[: img.shape[0], : img.shape[1]] = img
        out_seg[: seg.shape[0], : seg.shape[1]] = seg
        return (torch.from_numpy(out_img.transpose(2, 0, 1).copy()),
                torch.from_numpy(out_seg.astype(np.int64)))


def _folder_loader(args, root):
    import torch

    ds = FolderDataset(root, args)
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True,
                                     num_workers=args.threads, persistent_workers=True,
                                     drop_last=True)

    def forever():
        while True:
            yield from dl
    return forever()


def _our_loader(args, shards, backend):
    from eglp_dist.data.config import DataConfig
    from eglp_dist.data.loader import build_train_stream

    cfg = DataConfig(backend=backend, num_threads=args.threads, prefetch=2,
                     **({"resample": args.resample} if args.resample else {}))
    s = cfg.source
    s.shards, s.batch_size = shards, args.batch_size
    s.img_scale, s.ratio_range, s.crop_size = list(args.img_scale), list(args.ratio_range), list(args.crop)
    return build_train_stream(s, cfg, 0, 1, seed=0, device="cpu")


def _cpu_seconds() -> float:
    import psutil

    me = psutil.Process()
    procs = [me] + me.children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def run_one(args) -> dict:
    """Time one loader in this process; returns images/s and CPU-s per image."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    import eglp_dist  # noqa: F401

    torch.set_num_threads(1)
    work = Path(args.work)
    it = (_folder_loader(args, str(work / "cityscapes")) if args.one == "folder"
          else _our_loader(args, str(work / "shards"), args.one))
    for _ in range(args.warmup):
        batch = next(it)
    c0, t0 = _cpu_seconds(), time.perf_counter()
    for _ in range(args.batches):
        batch = next(it)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    img = batch["img"] if isinstance(batch, dict) else batch[0]
    n = args.batches * args.batch_size
    return {"loader": args.one, "images": n, "wall_s": wall, "cpu_s": cpu,
            "images_per_s": n / wall, "cpu_s_per_image": cpu / n, "shape": list(img.shape)}


def prepare(args) -> None:
    """Synthetic Cityscapes PNG folders + their shards (JPEG q95), made once per settings."""
    from eglp_dist.data.offline.pack import pack
    from eglp_dist.data.offline.synth import write_dataset

    work = Path(args.work)
    stamp = work / "settings.json"
    want = {"n": args.n, "size": list(args.size)}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    write_dataset("cityscapes", work / "cityscapes", n=args.n, splits=["train"],
                  size=tuple(args.size), seed=0, progress=True)
    pack("cityscapes", work / "cityscapes", "train", work / "shards", shard_size=32,
         workers=args.threads)
    stamp.write_text(json.dumps(want))


def table(results, args, load) -> str:
    """``results``: loader -> one dict per round (rounds in the same order for every loader)."""
    from eglp_dist import benchmarking as B

    names = {"folder": "(a) DataLoader, PNG folders, PIL", "pil": "(b) eglp pil (shards, PIL threads)",
             "dali": "(c) eglp DALI (cpu decode)"}
    base = results.get("folder")
    lines = [f"{args.n} synthetic Cityscapes images {args.size[0]}x{args.size[1]}, "
             f"img_scale {tuple(args.img_scale)}, ratio {tuple(args.ratio_range)}, crop "
             f"{args.crop[0]}x{args.crop[1]}, batch {args.batch_size}, {args.threads} threads/workers, "
             f"{args.batches} timed batches; ours resample {args.resample or 'mmcv (default)'}; "
             f"{args.repeats} rounds, order rotating; load average (1 min) "
             f"{load[0]} at start, {load[1]} at end",
             "| loader | images/s [min-max] | CPU-s / image | images/s vs (a), paired | CPU-s vs (a), paired |",
             "|---|---:|---:|---:|---:|"]
    for name, runs in results.items():
        rate = B.spread([r["images_per_s"] for r in runs])
        cpu = B.spread([r["cpu_s_per_image"] for r in runs])
        if base:
            speed = B.spread([r["images_per_s"] / b["images_per_s"] for r, b in zip(runs, base)])
            cost = B.spread([r["cpu_s_per_image"] / b["cpu_s_per_image"] for r, b in zip(runs, base)])
            rel = f"{B.format_spread(speed, 2)}x", f"{B.format_spread(cost, 2)}x"
        else:
            rel = "-", "-"
        lines.append(f"| {names[name]} | {B.format_spread(rate, 1)} | {cpu['median']:.4f} | {rel[0]} | {rel[1]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)))
        return 0
    from eglp_dist import benchmarking as B

    prepare(args)
    results = {name: [] for name in args.loaders}
    base_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    load = [B.load_average()]
    for r in range(args.repeats):
        for name in B.rotated(args.loaders, r):
            cmd = [sys.executable, "-m", "eglp_dist.runners.bench_loader"] + base_argv + ["--one", name]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r}: {name}: {results[name][-1]['images_per_s']:.1f} images/s", file=sys.stderr)
    load.append(B.load_average())
    print(table(results, args, load))
    B.write_json(args.json, {"args": vars(args), "load": load, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
