"""`eglp bench WHAT` runs the multi-rank tools as installed users call them (the spawned
ranks must be able to import the tool's worker)."""
import os
import subprocess
import sys


def test_bench_step_through_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "eglp_dist", "bench", "step", "--ranks", "2", "--iters", "1", "--warmup", "0",
         "data.source.crop_size=[64,64]", "data.target.crop_size=[64,64]"],
        capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("source_only", "uda"))]
    assert [(r[0], r[1]) for r in rows] == [("source_only", "0"), ("uda", "0"), ("source_only", "1"), ("uda", "1")]
    assert all(float(r[2]) > 0 for r in rows)
