"""Segmentor interface: every tiny config trains on CPU; losses; optimiser groups; configs."""
import glob
import os

import pytest
import torch

import eglp_dist  # noqa: F401
from eglp_dist.errors import ConfigError
from eglp_dist.models import build_segmentor, load_model_config
from eglp_dist.models.segmentor import seg_cross_entropy

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs", "model")
TINY = ["tiny_daformer", "tiny_hrda", "tiny_deeplabv3plus", "tiny_spn"]


def test_all_model_configs_load():
    names = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))
    assert {"daformer_mitb5", "hrda_mitb5", "deeplabv3plus_r50", "spn_r50", *TINY} <= set(names)
    for name in names:
        assert load_model_config(name).name == name


@pytest.mark.parametrize("name", TINY)
def test_tiny_config_forward_backward_on_cpu(name):
    torch.manual_seed(0)
    model = build_segmentor(load_model_config(name)).train()
    x = torch.randn(2, 3, 128, 128)
    seg = torch.randint(0, 19, (2, 128, 128))
    out = model(x, mode="train", generator=torch.Generator().manual_seed(0))
    assert out["logits"].shape == (2, 19, 32, 32)
    losses = model.losses(out, seg)
    assert torch.isfinite(losses["loss"]) and 0 <= float(losses["acc_seg"]) <= 100
    losses["loss"].backward()
    # every parameter is reached (timm zero-initialises each ResNet block's last BN, so some
    # gradients are exactly 0 at a random init; pretrained weights do not have that)
    assert all(p.grad is not None for p in model.parameters())
    first_conv = next(model.encoder.parameters())
    assert first_conv.dim() == 4 and first_conv.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 19, 128, 128)
        assert model(x, mode="predict").shape == (2, 19, 128, 128)
        assert len(model(x, mode="encode")) == 4


def test_cross_entropy_reductions_and_weights():
    logits = torch.randn(2, 5, 8, 8)
    seg = torch.randint(0, 5, (2, 8, 8))
    seg[0, :4] = 255
    per_pixel = torch.nn.functional.cross_entropy(logits, seg, ignore_index=255, reduction="none")
    assert torch.allclose(seg_cross_entropy(logits, seg), per_pixel.sum() / seg.numel())  # mmseg 0.x
    assert torch.allclose(seg_cross_entropy(logits, seg, avg_non_ignore=True),
                          torch.nn.functional.cross_entropy(logits, seg, ignore_index=255))
    w = torch.rand(2, 8, 8)
    assert torch.allclose(seg_cross_entropy(logits, seg, w), (per_pixel * w).mean())
    # logits at stride 4 are resized to the label
    small = torch.randn(2, 5, 2, 2)
    assert torch.isfinite(seg_cross_entropy(small, seg))


def test_param_groups_follow_daformer():
    model = build_segmentor(load_model_config("tiny_hrda"))
    groups = {g["name"]: g for g in model.param_groups(lr=6e-5, weight_decay=0.01)}
    assert set(groups) == {"encoder", "encoder_no_decay", "head"}
    assert groups["encoder"]["lr"] == 6e-5 and groups["head"]["lr"] == pytest.approx(6e-4)
    assert groups["encoder_no_decay"]["weight_decay"] == 0 and groups["head"]["weight_decay"] == 0.01
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in groups["encoder_no_decay"]["params"])
    assert any("scale_attention" in names[id(p)] for p in groups["head"]["params"])
    n_grouped = sum(len(g["params"]) for g in groups.values())
    assert n_grouped == len(list(model.parameters()))
    torch.optim.AdamW(list(groups.values()), lr=6e-5)  # accepted by torch optimisers


def test_config_objects_and_errors():
    from omegaconf import OmegaConf

    node = OmegaConf.create({"encoder": "mit_b0", "head": {"embed_dim": 16, "channels": 16}})
    assert type(build_segmentor(node)).__name__ == "Segmentor"
    with pytest.raises(ConfigError, match="model.head.type"):
        build_segmentor({"head": {"type": "upernet"}})
    with pytest.raises(ConfigError, match="model.bogus"):
        build_segmentor({"bogus": 1})
    with pytest.raises(ConfigError, match="model.spn.enabled"):
        load_model_config("tiny_hrda", {"spn.enabled": True})
    with pytest.raises(ConfigError, match="no_such_model"):
        load_model_config("no_such_model")


def test_forward_mode_unknown():
    model = build_segmentor(load_model_config("tiny_daformer"))
    with pytest.raises(ValueError, match="forward mode"):
        model(torch.randn(1, 3, 32, 32), mode="nope")
