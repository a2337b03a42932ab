"""`eglp bench WHAT` runs the multi-rank tools as installed users call them (the spawned
ranks must be able to import the tool's worker); the step benchmark's figures come from
rows built in the same ranks and interleaved."""
import json
import os
import subprocess
import sys

import pytest

from eglp_dist import benchmarking as B

SMALL = ["data.source.crop_size=[64,64]", "data.target.crop_size=[64,64]", "data.prompt.crop_size=[64,64]"]


def _bench_step(tmp_path, *args):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "eglp_dist", "bench", "step", "--ranks", "2", "--iters", "2",
                           "--warmup", "1", "--json", str(out), *args],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow  # ~40 s of 2-core time for a CLI smoke test: `make test-all` (what CI runs)
def test_bench_step_through_the_cli_interleaves_the_rows_in_the_same_ranks(tmp_path):
    stdout, raw = _bench_step(tmp_path, *SMALL)
    names = ["source_only", "uda", "pig", "eglp"]
    assert len(raw["per_rank"]) == 2
    for rank in raw["per_rank"]:
        assert list(rank["times"]) == names and all(len(t["wall"]) == 2 for t in rank["times"].values())
        ratios = B.paired_ratios(rank["times"], "source_only")
        assert ratios["source_only"]["median"] == 1.0 and ratios["uda"]["median"] > 1.0  # UDA does more work
        assert 0 < rank["shares"]["pig"]["ranking"] < 1 and 0 < rank["shares"]["eglp"]["reduce"] < 1
        assert rank["shares"]["uda"]["reduce"] is None and len(rank["load"]) == 2
    rows = [line.split() for line in stdout.splitlines() if line.startswith(tuple(names))]
    assert [(r[0], r[1]) for r in rows] == [(m, str(r)) for r in (0, 1) for m in names]
    assert "EGLP / PIG step time (paired, per rank)" in stdout and "load average" in stdout


@pytest.mark.slow  # a 2-rank benchmark run: `make test-all` (what CI runs)
def test_bench_step_spn_suite_puts_the_baseline_beside_spn(tmp_path):
    stdout, raw = _bench_step(tmp_path, "--suite", "spn", "data.source.crop_size=[64,64]", "data.source.batch_size=2")
    for rank in raw["per_rank"]:
        assert list(rank["times"]) == ["baseline", "spn"]
        # SPN adds only its per-level fusion weights to the baseline's parameters
        assert rank["info"]["spn"]["params"] > rank["info"]["baseline"]["params"]
    assert "spn / baseline step time (paired, per rank)" in stdout
