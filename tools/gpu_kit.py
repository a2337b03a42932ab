#!/usr/bin/env python
"""The GPU kit: a folder of wheels that makes ``tools/gpu_check.py`` runnable on a bare GPU
host with no package registry (``make gpu-kit`` here, ``tools/gpu_run.sh`` there).

The GPU hosts this project may be lent have CPython 3.12 and torch, torchvision, timm,
tensorboard, scipy and opencv preinstalled, and reach no registry; the working tree plus
carried folders may be at most 64 MiB. So the kit holds, as wheels for that interpreter
(manylinux x86_64 binaries where a package has compiled parts):

* what the project needs beyond the host's packages: DeepSpeed (built here with
  ``DS_BUILD_OPS=0``: a pure-Python wheel that JIT-builds nothing at import), webdataset,
  omegaconf, lpips, and their own requirements (pydantic-core, msgpack, ninja, psutil ...),
  at the versions this venv has (the project's pins);
* the project itself (``eglp_dist``, with its configs and tools).

What the host's packages pull in (torch's, timm's, tensorboard's requirements) is left out:
the host has it. DALI's wheel (about 600 MB installed) cannot travel: gpu_check reports DALI
as skipped and measures nvJPEG through ``torchvision.io.decode_jpeg(device="cuda")`` instead.

    python tools/gpu_kit.py --out build/gpu-kit                  # for the GPU host (cp312)
    python tools/gpu_kit.py --out build/kit311 --python-version 3.11   # for this machine (tests)
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# preinstalled on the GPU host: its opencv may be another build of cv2 than the headless wheel
# we pin (pip check then names it; `import cv2` is what the project needs)
HOST = ("torch", "torchvision", "timm", "tensorboard", "scipy", "opencv-python-headless")
KIT = ("deepspeed", "webdataset", "omegaconf", "lpips")  # what the project adds to them
BUILT_HERE = {"deepspeed"}  # an sdist whose setup.py needs torch: built against ours, no ops
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64", "manylinux_2_34_x86_64")
LIMIT_MIB = 60


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(dist: str) -> list:
    """Names ``dist`` requires unconditionally (no extras), from its installed metadata."""
    out = []
    for req in metadata.distribution(dist).requires or []:
        if "extra ==" in req:
            continue
        out.append(re.split(r"[ ;<>=!~\[(]", req.strip(), maxsplit=1)[0])
    return out


def closure(names) -> dict:
    """``{normalised name: installed version}`` of ``names`` and everything they require
    (requirements not installed here are markers for other platforms: skipped)."""
    seen, todo = {}, list(names)
    while todo:
        name = todo.pop()
        if _key(name) in seen:
            continue
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        seen[_key(name)] = version
        todo += requirements(name)
    return seen


def kit_contents() -> dict:
    host = closure(HOST)
    return {name: version for name, version in closure(KIT).items() if name not in host}


def _pip(*args, env=None) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True,
                   env={**os.environ, **(env or {})})


def fetch(name: str, version: str, out: Path, python_version: str) -> None:
    """One wheel for the target interpreter: a published binary or pure wheel if there is
    one, else built here from the sdist (allowed only where the result is pure Python)."""
    if name in BUILT_HERE:
        _pip("wheel", f"{name}=={version}", "--no-deps", "--no-build-isolation", "-w", str(out),
             env={"DS_BUILD_OPS": "0"})
        return
    abi = "cp" + python_version.replace(".", "")
    try:
        _pip("download", f"{name}=={version}", "--no-deps", "--only-binary=:all:", "--python-version",
             python_version, "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none",
             *[f"--platform={p}" for p in PLATFORMS], "--platform=any", "-d", str(out))
    except subprocess.CalledProcessError:
        before = set(out.iterdir())
        _pip("wheel", f"{name}=={version}", "--no-deps", "-w", str(out))
        built = [p for p in set(out.iterdir()) - before if p.suffix == ".whl"]
        if not built or not all(p.name.endswith("-py3-none-any.whl") for p in built):
            raise SystemExit(f"gpu_kit: {name}=={version} has no wheel for CPython {python_version} "
                             f"and its sdist does not build a pure-Python one ({[p.name for p in built]})")


def build(out: Path, python_version: str) -> list:
    """Fill ``out`` (emptied first) with the kit; returns its wheels."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    contents = kit_contents()
    for name, version in sorted(contents.items()):
        print(f"gpu_kit: {name}=={version}", file=sys.stderr)
        fetch(name, version, out, python_version)
    # the project itself, with its configs and tools (no dependencies: they are above or on the host)
    _pip("wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(out))
    wheels = sorted(out.glob("*.whl"))
    (out / "CONTENTS").write_text("".join(f"{w.name}\n" for w in wheels))
    return wheels


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "build" / "gpu-kit"))
    p.add_argument("--python-version", default="3.12", help="the GPU host's CPython (default 3.12)")
    a = p.parse_args(argv)
    wheels = build(Path(a.out), a.python_version)
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"gpu_kit: {len(wheels)} wheels, {size:.1f} MiB in {a.out} (limit {LIMIT_MIB} MiB)")
    for w in wheels:
        print(f"  {w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    if size > LIMIT_MIB:
        raise SystemExit(f"gpu_kit: {size:.1f} MiB is over the {LIMIT_MIB} MiB a device call may carry")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
