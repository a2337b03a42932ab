"""A regular install (`pip install .`, i.e. the wheel) carries its configs and runners: `eglp
train configs/...` and `eglp bench loader` work from any folder, without the source tree."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_SKIP = {".venv", ".git", "runs", "build", "data", "eglp_dist.egg-info", ".pytest_cache"}


def skip(folder, names):
    """Leave out the checkout's own state (venv, runs, build) and caches."""
    top = Path(folder) == ROOT
    return [n for n in names if n == "__pycache__" or (top and n in TOP_SKIP)]


@pytest.mark.slow  # builds a wheel and trains from it: `make test-all` (what CI runs)
def test_the_wheel_runs_shipped_configs_and_benchmarks_outside_the_source_tree(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=skip)
    # what `pip install .` builds (no network: our build deps are installed, no deps pulled)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "whl"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "whl").glob("eglp_dist-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # = the installed files
    shutil.rmtree(src)  # nothing may come from the source tree any more
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")

    def eglp(*args, timeout=300):
        return subprocess.run([sys.executable, "-m", "eglp_dist", *args], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=timeout)

    where = subprocess.run([sys.executable, "-c", "import eglp_dist; print(eglp_dist.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site)
    assert eglp("synth", "--dataset", "cityscapes", "--out", "cs", "--n", "4", "--size", "128", "64",
                "--split", "train").returncode == 0
    assert eglp("pack", "--dataset", "cityscapes", "--root", "cs", "--split", "train", "--out", "shards").returncode == 0
    run = eglp("train", "configs/demo/tiny_source_only.yaml", "data.source.shards=shards", "trainer.max_iters=2",
               "data.source.crop_size=[64,64]", "run.out_dir=runs", "trainer.eval_interval=0")
    assert run.returncode == 0, run.stderr[-2000:]
    assert (elsewhere / "runs" / "demo_source_only" / "checkpoints" / "latest" / "COMPLETE").is_file()
    bench = eglp("bench", "loader", "--work", "bl", "--n", "4", "--size", "128", "64", "--img-scale", "128", "64",
                 "--crop", "64", "64", "--batches", "2", "--warmup", "0", "--loaders", "pil")
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert "eglp pil" in bench.stdout
