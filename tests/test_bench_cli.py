"""`eglp bench WHAT` runs the multi-rank tools as installed users call them (the spawned
ranks must be able to import the tool's worker)."""
import os
import subprocess
import sys

import pytest


@pytest.mark.slow  # ~20 s of 2-core time for a CLI smoke test: `make test-all` (what CI runs)
def test_bench_step_through_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "eglp_dist", "bench", "step", "--ranks", "2", "--iters", "1", "--warmup", "0",
         "data.source.crop_size=[64,64]", "data.target.crop_size=[64,64]", "data.prompt.crop_size=[64,64]"],
        capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("source_only", "uda", "pig", "eglp"))]
    assert [(r[0], r[1]) for r in rows] == [(m, str(r)) for r in (0, 1) for m in ("source_only", "uda", "pig", "eglp")]
    assert all(float(r[2]) > 0 for r in rows)
    pig = [r for r in rows if r[0] == "pig"]
    assert all(0 < float(r[-2].rstrip("%")) < 100 for r in pig)  # the ranking's share of the step
    eglp = [r for r in rows if r[0] == "eglp"]
    assert all(0 < float(r[-2].rstrip("%")) < 100 for r in eglp)  # the statistics all-reduce's share
    assert "EGLP / PIG step time" in proc.stdout


@pytest.mark.slow  # a 2-rank benchmark run: `make test-all` (what CI runs)
def test_bench_step_spn_suite_puts_the_baseline_beside_spn():
    proc = subprocess.run(
        [sys.executable, "-m", "eglp_dist", "bench", "step", "--suite", "spn", "--ranks", "2", "--iters", "1",
         "--warmup", "0", "data.source.crop_size=[64,64]", "data.source.batch_size=2"],
        capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()
            if line.startswith(("baseline", "spn")) and line.split()[1].isdigit()]
    assert [(r[0], r[1]) for r in rows] == [(m, str(r)) for r in (0, 1) for m in ("baseline", "spn")]
    base, spn = rows[0], rows[1]
    assert float(base[3]) == 1.0 and float(spn[2]) > 0
    # SPN adds only its per-level fusion weights to the baseline's parameters
    assert int(spn[-1].replace(",", "")) > int(base[-1].replace(",", ""))
    assert "spn / baseline step time" in proc.stdout
