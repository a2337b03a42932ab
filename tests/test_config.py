"""Config composition and the errors a user sees."""
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from eglp_dist.config import PACKAGE_CONFIG_ROOT, load_config, save_resolved
from eglp_dist.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "demo" / "tiny_source_only.yaml"


def test_defaults_file_and_group_are_merged_in_order():
    cfg = load_config(DEMO)
    assert cfg.engine.kind == "ddp"  # from base.yaml's `engine: ddp`
    assert cfg.optim.weight_decay == pytest.approx(0.01)  # base.yaml
    assert cfg.optim.lr == pytest.approx(6e-4)  # the file overrides base.yaml's 6e-5
    assert cfg.trainer.max_iters == 600  # the file itself wins over base.yaml


def test_cli_value_and_group_overrides():
    cfg = load_config(DEMO, ["engine=zero2", "trainer.max_iters=7", "optim.betas=[0.8,0.9]"])
    assert cfg.engine.kind == "zero2" and cfg.trainer.max_iters == 7 and list(cfg.optim.betas) == [0.8, 0.9]


@pytest.mark.parametrize("override,message", [
    ("not.a.key=1", "unknown config key 'not.a.key'"),
    ("trainer.max_itrs=3", "did you mean 'trainer.max_iters'"),
    ("trainer.max_iters=abc", "config key 'trainer.max_iters'"),
    ("engine.kind=zero3", "'engine.kind': 'zero3' is not one of"),
    ("engine=zero3", "no config 'zero3' in group 'engine'"),
    ("trainer.max_iters=0", "'trainer.max_iters': 0 must be > 0"),
    ("optim.lr", "is not KEY=VALUE"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(DEMO, [override])


def test_unknown_key_in_a_file_names_key_and_file(tmp_path):
    bad = tmp_path / "configs" / "bad.yaml"
    bad.parent.mkdir()
    bad.write_text("trainer:\n  max_iter: 3\n")
    with pytest.raises(ConfigError, match=r"'trainer.max_iter' \(in .*bad.yaml\); did you mean 'trainer.max_iters'"):
        load_config(bad)


def test_defaults_cycle_and_missing_file_are_reported(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("defaults: [b.yaml]\n")
    b.write_text("defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(a)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(DEMO, ["run.name=x"])
    save_resolved(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def _eglp(*args):
    return subprocess.run([sys.executable, "-m", "eglp_dist", *args], capture_output=True, text=True, cwd=REPO)


def test_cli_lists_subcommands():
    out = _eglp("--help")
    assert out.returncode == 0
    for sub in ["train", "eval", "predict", "score", "pack", "synth", "convert-mit", "bench"]:
        assert sub in out.stdout


def test_cli_train_rejects_unknown_key_naming_it():
    out = _eglp("train", str(DEMO), "not.a.key=1")
    assert out.returncode == 2
    assert "unknown config key 'not.a.key'" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_key_of_a_method_node_the_active_method_does_not_read_is_said_once(capsys):
    from eglp_dist.config import PACKAGE_CONFIG_ROOT

    load_config(PACKAGE_CONFIG_ROOT / "demo" / "tiny_uda.yaml", ["method.eglp.dnis.temperature=7",
                                                                 "method.pseudo.threshold=0.9"])
    err = capsys.readouterr().err
    assert err.count("eglp: note:") == 1
    assert "method.eglp.dnis.temperature has no effect: method.name=uda does not read method.eglp" in err
    load_config(PACKAGE_CONFIG_ROOT / "demo" / "tiny_uda.yaml", ["method.name=eglp", "method.eglp.dnis.temperature=7"])
    assert "no effect" not in capsys.readouterr().err


# ------------------------------------------------------------------ one validation path

def test_field_rules_hold_on_every_path_a_config_takes():
    """Choices and bounds are declared on the fields and checked by one function on every
    merge (run configs, model files) and for configs built as dataclasses."""
    import pytest

    from eglp_dist.data.config import DataConfig, check_data_config
    from eglp_dist.errors import ConfigError
    from eglp_dist.models.config import load_model_config, validate

    with pytest.raises(ConfigError, match=r"model\.head\.embed_dim.*must be > 0"):
        load_model_config("tiny_daformer", {"head.embed_dim": 0})  # a model file's merge
    with pytest.raises(ConfigError, match=r"model\.spn\.prompt_prob.*in \[0, 1\]"):
        load_config(PACKAGE_CONFIG_ROOT / "demo" / "tiny_spn.yaml", ["model.spn.prompt_prob=2"])
    cfg = DataConfig()
    cfg.source.flip_prob = 1.5
    with pytest.raises(ConfigError, match=r"data\.source\.flip_prob.*in \[0, 1\]"):
        check_data_config(cfg)  # a dataclass, never merged
    from eglp_dist.models.config import ModelConfig

    m = ModelConfig()
    m.output_stride = 12
    with pytest.raises(ConfigError, match=r"model\.output_stride.*not one of \[None, 8, 16, 32\]"):
        validate(m)
