"""The launch scripts are valid shell and hand the config to `eglp_dist train`."""
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parent.parent / "launch"


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh", "slurm/train.sbatch"])
def test_launch_script_parses_and_runs_the_train_subcommand(script):
    path = LAUNCH / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    text = path.read_text()
    assert "eglp_dist train" in text or "--module eglp_dist train" in text
