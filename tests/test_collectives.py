"""Every collective of a training step accounted for, at 2 real gloo ranks: the counts are
pinned, so a new per-step collective (a stray all-reduce, DDP's buffer broadcasts coming
back) fails here. Counted by tools/bench_step.py's ``count_collectives`` (what
``eglp bench step --count-collectives`` prints): DDP's gradient buckets through a
communication hook, everything else by wrapping torch.distributed, named by its caller."""
import pytest

from dist_harness import run_ranks
from eglp_dist.runners import bench_step
from eglp_dist.config import PACKAGE_CONFIG_ROOT

SMALL = ["data.source.crop_size=[64,64]", "data.target.crop_size=[64,64]", "data.prompt.crop_size=[64,64]"]
GRADIENTS = "all_reduce (DDP bucket)"
# the minimum each recipe needs: one gradient reduction per trained engine (the tiny model's
# 13 MB of gradients fit one DDP bucket), and EGLP's one statistics reduction (DNIS + RCM)
EXPECTED = {
    "uda": {("gradients student", GRADIENTS): 1},
    "pig": {("gradients student", GRADIENTS): 1, ("gradients nfnet", GRADIENTS): 1},
    "eglp": {("gradients student", GRADIENTS): 1, ("gradients nfnet", GRADIENTS): 1,
             ("methods/eglp.py:start_statistics", "all_reduce"): 1},
}


@pytest.fixture(scope="module")
def counted():
    rows = [(name, [*SMALL, *extra]) for name, extra in bench_step.SUITES["uda"][1] if name in EXPECTED]
    return run_ranks(bench_step.count_collectives, 2, args=(str(PACKAGE_CONFIG_ROOT / "demo" / "tiny_eglp.yaml"), rows))


@pytest.mark.slow  # three recipes built and stepped at 2 ranks (~1 min): `make test-all`, what CI runs
@pytest.mark.parametrize("method", list(EXPECTED))
def test_a_step_issues_exactly_the_collectives_it_needs(counted, method):
    for rank in counted:  # every rank calls the same collectives
        calls = {(r["purpose"], r["collective"]): r["calls"] for r in rank[method]}
        assert calls == EXPECTED[method], calls
    stats = [r for r in counted[0][method] if r["purpose"].startswith("methods/")]
    # DNIS (2 sides x 19 classes x 9 sums) + RCM confidences (2 x 19), float64
    assert [r["bytes"] for r in stats] == ([(2 * 19 * 9 + 2 * 19) * 8] if method == "eglp" else [])
