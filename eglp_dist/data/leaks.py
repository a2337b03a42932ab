"""Data that must not meet: a training stream that holds evaluation images.

Checked at start-up from the manifests alone (no image is read), on every rank alike:

* the **prompt** stream (labelled night images a method trains on with their ground truth)
  and any evaluation target sharing a shard folder or a sample key (the image's file name:
  a prompt set copied out of a validation split keeps it) is an **error** naming both folders
  and the first shared samples: validation would leak into training with its labels;
* the **target** stream sharing a folder or a sample (same key *and* same path in its
  dataset: splits of one dataset may reuse frame names) with an evaluation target is said in
  one line (rank 0): unlabelled adaptation on the evaluation images (transductive) is a
  setting some benchmarks use on purpose, but it must not happen by a typo;
* the **source** stream is not checked (its labels are the task's; a target split it shares
  is named by the target check when it is also the source).

Samples are compared by key and source path, not by content: a content hash would need
every image read at start-up (ACDC's val split alone is over a gigabyte).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Set, Tuple

from eglp_dist.data.config import shard_folders
from eglp_dist.data.shards import Manifest
from eglp_dist.errors import ConfigError


def _samples(folders: Sequence[str], with_source: bool) -> Tuple[Set[Path], Set[str]]:
    """(resolved folders, sample ids: 'key K' or 'key K at S') of a stream's shard folders."""
    paths, ids = set(), set()
    for f in folders:
        paths.add(Path(f).resolve())
        for s in Manifest.load(f).data["samples"]:
            ids.add(f"key {s['key']}" + (f" at {s.get('source', '')}" if with_source else ""))
    return paths, ids


def shared(a: Sequence[str], b: Sequence[str], with_source: bool = False) -> List[str]:
    """What two streams' folders share: 'folder X' entries, else the shared sample ids."""
    pa, ia = _samples(a, with_source)
    pb, ib = _samples(b, with_source)
    both = sorted(pa & pb)
    if both:
        return [f"folder {p}" for p in both]
    return sorted(ia & ib)


def check_streams_disjoint(cfg, streams: Sequence[str]) -> None:
    """The checks above for a run that trains on ``streams`` and evaluates ``cfg.data.val``."""
    from eglp_dist.notices import notice

    targets = {name: shard_folders(t.shards, f"data.val.{name}.shards") for name, t in cfg.data.val.items()}
    for stream, fatal in (("prompt", True), ("target", False)):
        if stream not in streams:
            continue
        mine = shard_folders(getattr(cfg.data, stream).shards, f"data.{stream}.shards")
        if not mine:
            continue
        for name, folders in targets.items():
            if not folders:
                continue
            common = shared(mine, folders, with_source=not fatal)
            if not common:
                continue
            what = (f"data.{stream}.shards ({', '.join(mine)}) and data.val.{name}.shards ({', '.join(folders)}) "
                    f"share {len(common)} entr{'y' if len(common) == 1 else 'ies'}: {', '.join(common[:3])}"
                    + (" ..." if len(common) > 3 else ""))
            if fatal:
                raise ConfigError(f"{what}: the prompt images are trained on with their labels, so evaluation "
                                  f"would measure images the model was taught; use disjoint splits")
            notice(f"{what}: the target's training images are evaluation images (transductive "
                   f"adaptation); if that is not meant, use the target's train split")
