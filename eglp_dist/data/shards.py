"""The shard format, both ways: tar + DALI index writer, manifest, and a random-access reader.

This is the contract between ``eglp pack`` and every loader (docs/design.md; image formats in docs/data.md):

    <out>/<dataset>-<split>-000000.tar   GNU tar; per sample KEY.jpg|KEY.png, KEY.seg.png, KEY.json
    <out>/<dataset>-<split>-000000.idx   DALI webdataset index ("v1.2 N", then per sample
                                         "ext offset size name" per component), as wds2idx writes
    <out>/manifest.json                  dataset, split, samples (global order), class statistics

Why a random-access reader besides DALI's sequential ``readers.webdataset``: rare-class and
class-uniform sampling pick *which* sample comes next from class statistics, and exact resume
needs each batch to be a pure function of (seed, rank, step). Both need to fetch sample i on
demand; the .idx offsets make that one ``pread`` per component, with no tar parsing.
"""
from __future__ import annotations

import bisect
import io
import json
import os
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from eglp_dist.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "eglp-shards/1"
IDX_VERSION = "v1.2"
IMAGE_EXTS = ("jpg", "png")
SEG_EXT = "seg.png"
META_EXT = "json"


def shard_name(dataset: str, split: str, index: int) -> str:
    return f"{dataset}-{split}-{index:06d}.tar"


def is_shard_folder(folder) -> bool:
    """A folder ``eglp pack`` wrote: its manifest parses and names our format. The test
    before anything replaces a folder (``pack --overwrite``)."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def split_name(name: str) -> Tuple[str, str]:
    """'KEY.seg.png' -> ('KEY', 'seg.png'): the extension starts at the first dot of the
    basename, as in DALI's wds2idx and the webdataset library."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


class ShardWriter:
    """Writes one GNU tar shard and, on close, its DALI index next to it.

    Offsets are recorded while writing (data offset = header offset + 512, names are kept
    under 100 bytes so no GNU long-name header is ever needed), so the index is exactly what
    ``wds2idx`` computes from ``tar --list --block-num`` (tested).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._tar = tarfile.open(self.path, "w", format=tarfile.GNU_FORMAT)
        self._lines: List[str] = []

    def add(self, key: str, components: Dict[str, bytes]) -> None:
        parts = []
        for ext, data in components.items():
            name = f"{key}.{ext}"
            if len(name.encode()) >= 100:
                raise ValueError(f"member name too long for a plain tar header: {name}")
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uname = info.gname = ""
            header_at = self._tar.fileobj.tell()
            self._tar.addfile(info, io.BytesIO(data))
            parts.append(f"{ext} {header_at + 512} {len(data)} {name}")
        self._lines.append(" ".join(parts))

    def close(self) -> int:
        self._tar.close()
        idx = self.path.with_suffix(".idx")
        idx.write_text(f"{IDX_VERSION} {len(self._lines)}\n" + "".join(line + "\n" for line in self._lines))
        return len(self._lines)


def read_idx(path: Path) -> List[Dict[str, Tuple[int, int, str]]]:
    """Parse a DALI index: per sample {ext: (offset, size, member name)}."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read shard index ({exc.strerror})") from None
    if not lines or not lines[0].startswith(IDX_VERSION + " "):
        raise DataError(f"{path}: not a DALI webdataset index (expected '{IDX_VERSION} N' first)")
    n = int(lines[0].split()[1])
    samples = []
    for ln, line in enumerate(lines[1:], start=2):
        f = line.split()
        if len(f) % 4 or not f:
            raise DataError(f"{path}:{ln}: malformed index line")
        samples.append({f[i]: (int(f[i + 1]), int(f[i + 2]), f[i + 3]) for i in range(0, len(f), 4)})
    if len(samples) != n:
        raise DataError(f"{path}: header says {n} samples, found {len(samples)}")
    return samples


@dataclass
class Manifest:
    """manifest.json of a shard folder, validated on load."""

    folder: Path
    data: dict

    @classmethod
    def load(cls, folder) -> "Manifest":
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise DataError(f"{path}: no manifest (is {folder} an `eglp pack --out` folder?)")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: unreadable manifest ({exc})") from None
        for key in ("dataset", "split", "num_samples", "shards", "samples", "class_pixels",
                    "sample_class_pixels", "labelled"):
            if key not in data:
                raise DataError(f"{path}: manifest has no {key!r}")
        if len(data["samples"]) != data["num_samples"] or \
                sum(s["num_samples"] for s in data["shards"]) != data["num_samples"]:
            raise DataError(f"{path}: sample counts disagree")
        for s in data["shards"]:
            for k in ("path", "index"):
                if not (folder / s[k]).is_file():
                    raise DataError(f"{folder / s[k]}: listed in {path} but missing")
        return cls(folder, data)

    def __len__(self) -> int:
        return self.data["num_samples"]

    @property
    def labelled(self) -> bool:
        return bool(self.data["labelled"])

    @property
    def shard_paths(self) -> List[Path]:
        return [self.folder / s["path"] for s in self.data["shards"]]

    @property
    def index_paths(self) -> List[Path]:
        return [self.folder / s["index"] for s in self.data["shards"]]

    @property
    def shard_starts(self) -> List[int]:
        """Global index of each shard's first sample."""
        out, n = [], 0
        for s in self.data["shards"]:
            out.append(n)
            n += s["num_samples"]
        return out

    def sample(self, i: int) -> dict:
        return self.data["samples"][i]

    def origin(self, i: int) -> str:
        """'<shard path>:<key>' of sample i, for error messages."""
        info = self.data["samples"][i]
        return f"{self.folder / self.data['shards'][info['shard']]['path']}:{info['key']}"


def eval_range(num_samples: int, rank: int, world_size: int) -> range:
    """Samples rank ``rank`` evaluates: the contiguous part DALI's readers give shard_id=rank
    of num_shards=world_size (start = N * rank // world). Disjoint, covering, no padding."""
    return range(num_samples * rank // world_size, num_samples * (rank + 1) // world_size)


class ShardReader:
    """Random access to sample i's components by offset (thread-safe: ``os.pread``).

    Opening checks each shard against the manifest before anything is read: the index must
    list the manifest's keys in the manifest's order, and the tar must hold, at the offsets
    of its first and last sample, the members the index names. So a ``.tar``/``.idx`` pair
    swapped with another shard's (or a tar swapped under its index) fails here, naming the
    shard, instead of feeding rare class sampling statistics of other images.
    """

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self._where: List[Tuple[int, Dict[str, Tuple[int, int, str]]]] = []
        expected = [[] for _ in manifest.data["shards"]]
        for s in manifest.data["samples"]:
            expected[s["shard"]].append(s["key"])
        for si, (idx_path, entry) in enumerate(zip(manifest.index_paths, manifest.data["shards"])):
            samples = read_idx(idx_path)
            if len(samples) != entry["num_samples"]:
                raise DataError(f"{idx_path}: {len(samples)} samples, manifest says "
                                f"{entry['num_samples']}")
            keys = [split_name(next(iter(c.values()))[2])[0] for c in samples]
            if keys != expected[si]:
                bad = next(i for i, (a, b) in enumerate(zip(keys, expected[si])) if a != b) \
                    if len(keys) == len(expected[si]) else 0
                raise DataError(f"{idx_path}: sample {bad} is {keys[bad] if keys else None!r} but "
                                f"{manifest.folder / MANIFEST} lists {expected[si][bad] if expected[si] else None!r} "
                                f"there: this index belongs to another shard (files swapped or "
                                f"replaced after packing?)")
            self._where.extend((si, s) for s in samples)
        self._fds: Dict[int, int] = {}
        self._lock = threading.Lock()
        for si in range(len(manifest.data["shards"])):
            self._check_members(si)

    def _check_members(self, shard: int) -> None:
        """The tar headers before the first and last sample's members name those members."""
        entries = [c for si, c in self._where if si == shard]
        for comps in (entries[:1] + entries[-1:]) if entries else []:
            off, _, name = next(iter(comps.values()))
            header = os.pread(self._fd(shard), 512, off - 512)
            found = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if found != name:
                raise DataError(f"{self.manifest.shard_paths[shard]}: holds {found!r} where its index "
                                f"{self.manifest.index_paths[shard].name} expects {name!r} (tar and "
                                f"index do not belong together)")

    def require(self, ext: str) -> "ShardReader":
        """DataError naming the shard and the first sample without component ``ext``."""
        lacking = [i for i, (_, comps) in enumerate(self._where) if ext not in comps]
        if lacking:
            raise DataError(f"{self.origin(lacking[0])}: sample has no {ext} ({len(lacking)} of "
                            f"{len(self._where)} samples in {self.manifest.folder} lack it)")
        return self

    def origin(self, i: int) -> str:
        return self.manifest.origin(i)

    def __len__(self) -> int:
        return len(self._where)

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            with self._lock:
                fd = self._fds.get(shard)
                if fd is None:
                    fd = os.open(self.manifest.shard_paths[shard], os.O_RDONLY)
                    self._fds[shard] = fd
        return fd

    def read(self, i: int, exts: Optional[Tuple[str, ...]] = None) -> Dict[str, bytes]:
        """{ext: bytes} of sample i (all components, or only ``exts`` that exist)."""
        shard, comps = self._where[i]
        fd = self._fd(shard)
        out = {}
        for ext, (off, size, name) in comps.items():
            if exts is not None and ext not in exts:
                continue
            data = os.pread(fd, size, off)
            if len(data) != size:
                raise DataError(f"{self.manifest.shard_paths[shard]}: truncated at {name}")
            out[ext] = data
        return out

    def key(self, i: int) -> str:
        _, comps = self._where[i]
        return split_name(next(iter(comps.values()))[2])[0]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def combine_manifests(manifests: List[Manifest]) -> Manifest:
    """One manifest over several shard folders read as one dataset, in the order given:
    samples and shards concatenated (shard paths made absolute; each sample keeps its own
    dataset and split), class statistics summed, so sampling, evaluation ranges and resume
    see a single split; ``dataset``/``split`` join the folders' names with ``+``."""
    if len(manifests) == 1:
        return manifests[0]
    shards, samples, per = [], [], []
    class_pixels = [0] * len(manifests[0].data["class_pixels"])
    for m in manifests:
        base = len(shards)
        shards += [dict(s, path=str((m.folder / s["path"]).resolve()),
                        index=str((m.folder / s["index"]).resolve())) for s in m.data["shards"]]
        samples += [dict(s, shard=s["shard"] + base, dataset=m.data["dataset"], split=m.data["split"])
                    for s in m.data["samples"]]
        per += m.data["sample_class_pixels"]
        class_pixels = [a + b for a, b in zip(class_pixels, m.data["class_pixels"])]
    names = lambda k: "+".join(dict.fromkeys(str(m.data[k]) for m in manifests))  # noqa: E731
    data = dict(manifests[0].data, dataset=names("dataset"), split=names("split"),
                num_samples=len(samples), shards=shards, samples=samples, class_pixels=class_pixels,
                sample_class_pixels=per, labelled=all(m.labelled for m in manifests),
                folders=[str(m.folder) for m in manifests])
    return Manifest(manifests[0].folder, data)


class ShardSet:
    """Random access over one or several shard folders, each opened and validated as its
    own :class:`ShardReader` (errors name the right folder); global sample i is the i-th of
    the folders' samples in order. ``manifest`` is their :func:`combine_manifests`."""

    def __init__(self, readers: List[ShardReader]):
        self.readers = readers
        self.manifest = combine_manifests([r.manifest for r in readers])
        self._starts = []
        n = 0
        for r in readers:
            self._starts.append(n)
            n += len(r)
        self._n = n

    def _locate(self, i: int) -> Tuple[ShardReader, int]:
        k = bisect.bisect_right(self._starts, i) - 1
        return self.readers[k], i - self._starts[k]

    def __len__(self) -> int:
        return self._n

    def read(self, i: int, exts: Optional[Tuple[str, ...]] = None) -> Dict[str, bytes]:
        reader, j = self._locate(i)
        return reader.read(j, exts)

    def origin(self, i: int) -> str:
        reader, j = self._locate(i)
        return reader.origin(j)

    def key(self, i: int) -> str:
        reader, j = self._locate(i)
        return reader.key(j)

    def require(self, ext: str) -> "ShardSet":
        for r in self.readers:
            r.require(ext)
        return self

    def close(self) -> None:
        for r in self.readers:
            r.close()


def open_shards(folders) -> ShardSet:
    """The one way a loader opens its shards (a folder or a list of folders): each manifest
    loaded and validated, every shard checked against it (:class:`ShardReader`). Every
    stream, training and evaluation, opens its folders with this at start-up, so bad data
    stops a run before its first step, not at its first evaluation."""
    folders = [folders] if isinstance(folders, (str, os.PathLike)) else list(folders)
    if not folders:
        raise DataError("no shard folder given")
    return ShardSet([ShardReader(Manifest.load(f)) for f in folders])


def image_ext(components) -> str:
    """The image extension present in a sample's components (jpg or png)."""
    for ext in IMAGE_EXTS:
        if ext in components:
            return ext
    raise DataError(f"sample has no image component ({', '.join(components)})")
