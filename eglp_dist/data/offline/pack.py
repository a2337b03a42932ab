"""``eglp pack``: a dataset folder in its published layout -> WebDataset shards + DALI index +
manifest with class statistics.

Why pack at all: tens of thousands of small PNG pairs are slow to list, open and decode on
every epoch and every node; a few large tar shards stream well from any file system, DALI
decodes their JPEGs on the GPU, and the manifest's per-sample class pixel counts let rare
class and class-uniform sampling choose samples without reading a single image.

Work is split so that each part is simple: workers (processes) read, validate and encode
one sample each; the parent writes shards in the shuffled order and the manifest; everything
goes to a temporary folder that is renamed to ``--out`` only when all of it is written.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import re
import sys
import zlib
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from eglp_dist.data import labels as L
from eglp_dist.data import shards as S
from eglp_dist.data.codecs import BadSample, encode_jpeg, encode_png, load_image, load_label
from eglp_dist.data.offline.layouts import Pair, get_layout
from eglp_dist.atomic import atomic_dir
from eglp_dist.errors import DataError
from eglp_dist.interrupt import worker_signals

_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_MAX_KEY = 80  # KEY + ".seg.png" stays far below tar's 100-byte name field


def make_keys(pairs: List[Pair]) -> List[str]:
    """Unique tar keys from file names: no dots (extensions start at the first dot), no
    slashes, < 100 bytes with the extension; the parent folder or a counter disambiguates."""
    keys, seen = [], set()
    for p in pairs:
        name = p.image.name[: len(p.image.name) - len(p.image.suffix)]
        stem = _KEY_CHARS.sub("_", name).strip("_") or "sample"
        key = stem
        if key in seen:
            key = _KEY_CHARS.sub("_", p.image.parent.name) + "_" + stem
        if len(key) > _MAX_KEY:
            key = key[: _MAX_KEY - 9] + f"_{zlib.crc32(key.encode()):08x}"
        base, n = key, 1
        while key in seen:
            key, n = f"{base}_{n}", n + 1
        seen.add(key)
        keys.append(key)
    return keys


def _encode_sample(job) -> dict:
    """Read, validate and encode one sample (runs in a worker). Raises BadSample."""
    pair, key, meta, image_format, quality = job
    if pair.missing_label:
        raise BadSample(f"{pair.image}: missing label (expected {pair.missing_label})")
    raw = None
    try:
        raw = pair.image.read_bytes()
    except OSError as exc:
        raise BadSample(f"{pair.image}: cannot read image ({exc.strerror})") from None
    im = load_image(raw, str(pair.image))
    # An RGB JPEG source is kept byte-for-byte in either format: no second lossy generation,
    # and for png the very pixels the source decodes to (a PNG of them only takes more bytes).
    keep = im.format == "JPEG" and im.mode == "RGB"
    im = im if im.mode == "RGB" else im.convert("RGB")
    if keep:
        img_bytes = raw
    elif image_format == "jpg":
        img_bytes = encode_jpeg(im, quality)
    else:
        img_bytes = encode_png(np.asarray(im))
    out = {"key": key, "image": img_bytes, "size": list(im.size), "counts": None, "seg": None}
    if pair.label is not None:
        train = load_label(pair.label, pair.encoding)
        if train.shape != (im.size[1], im.size[0]):
            raise BadSample(f"{pair.label}: label is {train.shape[1]}x{train.shape[0]} but image "
                            f"{pair.image} is {im.size[0]}x{im.size[1]}")
        out["seg"] = encode_png(train)
        out["counts"] = np.bincount(train.ravel(), minlength=256)[:L.NUM_CLASSES].tolist()
    out["meta"] = json.dumps({**meta, "key": key, "size": list(im.size)}, sort_keys=True).encode()
    return out


def _worker(job):
    try:
        return True, _encode_sample(job)
    except BadSample as exc:
        return False, (str(job[0].rel), str(exc))


def check_output(out: Path, root: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` whose replacement could destroy data: one that is, holds or lies
    inside the dataset root, or an existing path that is not a shard folder of ours."""
    o, r = out.resolve(), root.resolve()
    if o == r or r in o.parents or o in r.parents:
        rel = "is" if o == r else ("lies inside" if r in o.parents else "contains")
        raise DataError(f"--out {out} {rel} the dataset root {root}: shards must go to a folder "
                        f"of their own (e.g. shards/<dataset>/<split>)")
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise DataError(f"{out}: output folder exists (remove it or pass --overwrite)")
    if not out.is_dir() or out.is_symlink():
        raise DataError(f"{out}: exists and is not a folder; --overwrite replaces only a shard "
                        f"folder written by `eglp pack`")
    if not S.is_shard_folder(out):
        raise DataError(f"{out}: not a shard folder written by `eglp pack` (no {S.MANIFEST} of "
                        f"format {S.FORMAT}); --overwrite refuses to replace it")


@contextlib.contextmanager
def _encoded(jobs, workers: int):
    """Encoded samples in job order, from a process pool when ``workers > 1``; the pool is
    terminated however the block is left (an error, Ctrl-C, SIGTERM)."""
    if workers <= 1:
        yield map(_worker, jobs)
        return
    # fork is fast; but never fork a process whose DALI threads are running (16-bit labels
    # decode with DALI in the workers): spawn then.
    method = "spawn" if "nvidia.dali.backend_impl" in sys.modules else "fork"
    pool = mp.get_context(method).Pool(workers, initializer=worker_signals)
    try:
        yield pool.imap(_worker, jobs, chunksize=4)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


EVAL_SPLITS = ("val", "test")  # packed losslessly by default: scores on the papers' pixels


def image_format_for(split: str, image_format: str = "auto") -> str:
    """``auto``: lossless PNG for evaluation splits (a score must be taken on the dataset's
    own pixels), JPEG for training splits (nvJPEG decodes them on the GPU; q95 is far below
    the augmentation's own changes)."""
    if image_format != "auto":
        return image_format
    return "png" if split in EVAL_SPLITS else "jpg"


def pack(dataset: str, root, split: str, out, shard_size: int = 1000, image_format: str = "auto",
         quality: int = 95, workers: int = 2, skip_bad: bool = False, seed: int = 0,
         overwrite: bool = False, progress: bool = True) -> dict:
    """Pack one split of a dataset into ``out``; returns the manifest dict.

    Raises DataError naming the file and the problem on bad input (unless ``skip_bad``, in
    which case bad samples are listed under ``skipped``); ``out`` is then not created.
    """
    if image_format not in ("auto", "jpg", "png"):
        raise DataError(f"--image-format must be auto, jpg or png, got {image_format!r}")
    image_format = image_format_for(split, image_format)
    if not 1 <= quality <= 100:
        raise DataError(f"--quality must be in 1..100, got {quality}")
    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {shard_size}")
    layout = get_layout(dataset)
    out, root = Path(out), Path(root)
    check_output(out, root, overwrite)
    pairs = layout.find(root, split)
    order = np.random.default_rng(seed).permutation(len(pairs))  # shuffled at pack time
    pairs = [pairs[i] for i in order]
    keys = make_keys(pairs)
    labelled = split in layout.labelled_splits
    jobs = [(p, k, {"source": p.rel, "label": (p.label.relative_to(root).as_posix()
                                                if p.label else None),
                    "dataset": dataset, "split": split}, image_format, quality)
            for p, k in zip(pairs, keys)]

    with atomic_dir(out) as tmp, _encoded(jobs, workers) as results:
        if progress:
            from eglp_dist.progress import progress as show_progress
            results = show_progress(results, total=len(jobs), desc=f"pack {dataset}/{split}", unit="img")
        manifest = _write(results, tmp, dataset, split, shard_size, labelled, skip_bad)
        manifest["root"] = str(root.resolve())
        manifest["image_format"] = image_format
        manifest["seed"] = seed
        (tmp / S.MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _write(results, tmp: Path, dataset: str, split: str, shard_size: int, labelled: bool,
           skip_bad: bool) -> dict:
    shards, samples, per_sample, skipped = [], [], [], []
    class_pixels = np.zeros(L.NUM_CLASSES, np.int64)
    writer: Optional[S.ShardWriter] = None
    for ok, res in results:
        if not ok:
            if not skip_bad:
                raise DataError(res[1])
            skipped.append({"source": res[0], "error": res[1]})
            continue
        if writer is None or shards[-1]["num_samples"] == shard_size:
            if writer is not None:
                writer.close()
            name = S.shard_name(dataset, split, len(shards))
            writer = S.ShardWriter(tmp / name)
            shards.append({"path": name, "index": name[:-4] + ".idx", "num_samples": 0})
        comps: Dict[str, bytes] = {("jpg" if res["image"][:2] == b"\xff\xd8" else "png"):
                                   res["image"]}
        if res["seg"] is not None:
            comps[S.SEG_EXT] = res["seg"]
        comps[S.META_EXT] = res["meta"]
        writer.add(res["key"], comps)
        shards[-1]["num_samples"] += 1
        meta = json.loads(res["meta"])
        samples.append({"key": res["key"], "shard": len(shards) - 1, "source": meta["source"],
                        "size": res["size"]})
        counts = res["counts"] if res["counts"] is not None else [0] * L.NUM_CLASSES
        per_sample.append(counts)
        class_pixels += np.asarray(counts, np.int64)
    if writer is not None:
        writer.close()
    if not samples:
        raise DataError(f"no usable samples in {dataset} split {split!r} "
                        f"({len(skipped)} skipped)")
    return {
        "format": S.FORMAT, "dataset": dataset, "split": split, "labelled": labelled,
        "num_samples": len(samples), "num_classes": L.NUM_CLASSES, "classes": list(L.CLASSES),
        "shards": shards, "class_pixels": class_pixels.tolist(), "samples": samples,
        "sample_class_pixels": per_sample, "skipped": skipped,
    }


def run_cli(args) -> int:
    """`eglp pack --dataset NAME --root DIR --split SPLIT --out DIR [...]`."""
    m = pack(args.dataset, args.root, args.split, args.out, shard_size=args.shard_size,
             image_format=args.image_format, quality=args.quality, workers=args.workers,
             skip_bad=args.skip_bad, seed=args.seed, overwrite=args.overwrite)
    print(f"packed {m['num_samples']} samples of {args.dataset}/{args.split} into "
          f"{len(m['shards'])} shard(s) in {args.out}"
          + (f"; skipped {len(m['skipped'])} bad sample(s)" if m["skipped"] else ""))
    return 0
