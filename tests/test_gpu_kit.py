"""The GPU kit: built here (wheels from the registry, DeepSpeed built without ops, the
project), installed with no index into a fresh venv that holds only what a GPU host has
preinstalled (torch, torchvision, timm, tensorboard, scipy, opencv and their requirements), where
tools/gpu_run.sh must run gpu_check.py --dry-run to the end. Built for this interpreter's
version (the GPU host's is 3.12: `make gpu-kit`)."""
import importlib.util
import json
import os
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


def _load_gpu_kit():
    """tools/gpu_kit.py (a build tool of the checkout, not part of the package)."""
    spec = importlib.util.spec_from_file_location("gpu_kit", TOOLS / "gpu_kit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_kit = _load_gpu_kit()


def _host_site(folder: Path) -> Path:
    """A folder of links to the host packages' files in this venv (their requirements too)."""
    folder.mkdir()
    for name in gpu_kit.closure(gpu_kit.HOST):
        dist = metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)
    return folder


@pytest.mark.slow  # builds the kit (registry downloads) and runs the dry GPU check: `make test-all` (CI)
@pytest.mark.timeout(1200)  # ~4 min on 2 busy cores; the suite's 300 s default would be too close
def test_the_kit_installs_offline_over_a_bare_host_and_runs_the_gpu_check(tmp_path):
    kit = tmp_path / "kit"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run([sys.executable, str(TOOLS / "gpu_kit.py"), "--out", str(kit), "--python-version", version],
                   check=True, timeout=900)
    wheels = (kit / "CONTENTS").read_text().split()
    assert any(w.startswith("deepspeed-") and w.endswith("py3-none-any.whl") for w in wheels)
    assert any(w.startswith("eglp_dist-") for w in wheels) and not any(w.startswith("torch-") for w in wheels)
    host = tmp_path / "host"
    venv.create(host, with_pip=True)
    site = next((host / "lib").glob("python*/site-packages"))
    (site / "gpu_host.pth").write_text(str(_host_site(tmp_path / "host_packages")) + "\n")
    probe = [str(host / "bin" / "python"), "-c", "import torch; import importlib.util as u; "
             "print(u.find_spec('deepspeed') is None and u.find_spec('omegaconf') is None)"]
    assert subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip() == "True"
    env = dict(os.environ, KIT=str(kit), VENV=str(host), OUT=str(tmp_path / "out"), OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_run.sh"), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check" / "gpu_check.json").read_text())
    assert report["dry_run"] and report["step"] and report["train_loop"]
    decode = {r["loader"] for r in report["decode"]}
    assert "jpeg only: PIL (cpu)" in decode  # torchvision's decoder: measured or skipped with its reason
    assert "jpeg only: torchvision (cpu)" in decode or any("torchvision (cpu)" in x for x in report["skipped"])
    assert any("nvidia-dali is not installed" in x for x in report["skipped"])
