"""`eglp ablate` as a user runs it: a warm-started study (stage 0 then variants from its whole
model) that writes its commands and table, and continues where it stopped: a second call
retrains nothing that finished."""
import json
import os
import subprocess
import sys

import pytest
from pathlib import Path

from eglp_dist import study


def test_paired_differences_and_the_classes_to_gain_are_fixed_in_advance():
    p = study.paired([3.0, 1.0, 2.0], [1.0, 2.0, 2.0])
    assert p["diffs"] == [2.0, -1.0, 0.0] and p["positive"] == 1 and p["negative"] == 1 and p["n"] == 3
    changed = study.classes_to_gain()
    assert "sky" in changed and "building" in changed and "road" not in changed  # synth's design, no run
    log = [{"iter": 10, "x": 1.0}, {"iter": 20, "x": 3.0}, {"iter": 30, "x": None}, {"iter": 40, "x": 5.0}]
    assert study.second_half_mean(log, "x", 40) == 5.0  # after iteration 20, nulls skipped


def test_a_run_folder_is_named_by_every_setting_that_changes_the_result(tmp_path, monkeypatch):
    root = tmp_path / "study"
    a = study.RunSpec("EGLP", "tiny_eglp", ("x=1",), 0, 10)
    assert a.key(root) == study.RunSpec("other label", "tiny_eglp", ("x=1",), 0, 10).key(root)
    for b in (study.RunSpec("EGLP", "tiny_eglp", ("x=2",), 0, 10), study.RunSpec("EGLP", "tiny_eglp", ("x=1",), 1, 10),
              study.RunSpec("EGLP", "tiny_eglp", ("x=1",), 0, 11), study.RunSpec("EGLP", "tiny_pig", ("x=1",), 0, 10)):
        assert b.key(root) != a.key(root)
    # the study folder spelled relative or absolute (or moved): the same runs
    monkeypatch.chdir(tmp_path)
    rel = study.RunSpec("EGLP", "tiny_eglp", ("model.init_from=study/runs/s0/checkpoints/latest",), 0, 10)
    absolute = study.RunSpec("EGLP", "tiny_eglp", (f"model.init_from={root}/runs/s0/checkpoints/latest",), 0, 10)
    assert rel.key(Path("study")) == absolute.key(root)
    moved = study.RunSpec("EGLP", "tiny_eglp", (f"model.init_from={tmp_path}/elsewhere/runs/s0/checkpoints/latest",), 0, 10)
    assert moved.key(tmp_path / "elsewhere") == absolute.key(root)


@pytest.mark.slow  # three tiny 2-rank trainings, twice: `make test-all` (what CI runs)
def test_ablate_warm_starts_writes_its_commands_and_reuses_finished_runs(tmp_path):
    args = [sys.executable, "-m", "eglp_dist", "ablate", "--out", str(tmp_path), "--pretrain", "2", "--iters", "2",
            "--seeds", "0", "--train-images", "8", "--val-images", "4", "--only", "UDA (HRDA)", "EGLP",
            "--set", "data.source.crop_size=[64,64]", "data.target.crop_size=[64,64]", "data.prompt.crop_size=[64,64]",
            "method.eglp.rcm.patch=16"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run(args, capture_output=True, text=True, timeout=400, env=env)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    commands = (tmp_path / "commands.sh").read_text()
    assert commands.count("torch.distributed.run") == 3  # stage 0, UDA, EGLP
    assert "model.init_from=" in commands and "optim.lr=6e-5" in commands
    table = (tmp_path / "ablation.md").read_text()
    assert "| EGLP |" in table and "pseudo weight" in table and "| EGLP | final |" in table
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["EGLP"]["0"]["pseudo"]) == {"teacher", "nfnet", "dms", "fused", "final"}
    second = subprocess.run(args, capture_output=True, text=True, timeout=200, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("done before, reused") == 3
    assert (tmp_path / "commands.sh").read_text().count("torch.distributed.run") == 3  # nothing retrained
    more = subprocess.run(args[:args.index("--seeds")] + ["--seeds", "0", "1", "--report-only"] + args[args.index("--train-images"):],
                          capture_output=True, text=True, timeout=200, env=env)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "seeds with every row finished: [0] (of [0, 1])" in more.stdout  # seed 1 not trained
    assert (tmp_path / "commands.sh").read_text().count("torch.distributed.run") == 3
