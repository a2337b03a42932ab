"""tools/gpu_check.py's dry run: every check runs its code path (tiny, CPU, gloo) and the
report says what it measured and what it skipped."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~1.5-2.5 min of 2-core time: `make test-all` (what CI runs)
def test_gpu_check_dry_run_runs_every_check_and_names_what_it_skipped(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    assert {r["loader"] for r in report["decode"]} >= {"dali (cpu)", "pil"}
    # the real loop, 1 and 2 ranks: trained, evaluated, checkpointed, resumed
    assert [r["world"] for r in report["train_loop"]] == [1, 2]
    assert all(r["ok"] and r["mIoU"] is not None for r in report["train_loop"])
    rows = {(r["method"], r["engine"], r["precision"], r["world"]): r for r in report["step"] + report["precision"]
            + report["nccl2"]}
    for method in ("uda", "pig", "eglp"):
        for engine in ("ddp", "zero2"):
            r = rows[(method, engine, "bf16", 1)]
            assert r["s_per_iter"] > 0
            # bf16 asked for: the forward inside each engine's wrapper runs under it (ZeRO too)
            assert set(r["autocast"].values()) == {"bfloat16"}, r["autocast"]
    assert rows[("uda", "ddp", "fp32", 1)]["autocast"] == {"student": "off"}
    assert {("uda", "ddp", "bf16", 2), ("uda", "zero2", "bf16", 2)} <= set(rows)
    assert 0 < report["ratios"]["ZeRO-2 / DDP optimizer state per rank (2 ranks)"] < 1
    assert [r["batched_slide"] for r in report["eval"]] == [True, False]
    skipped = " ".join(report["skipped"])
    assert "nvJPEG" in skipped and "TF32" in skipped and "sync debug mode" in skipped
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| uda | zero2 | bf16 | 1 |" in md and "Skipped:" in md
