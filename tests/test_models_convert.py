"""MiT weights: SegFormer/mmseg layout <-> timm layout, `eglp convert-mit`, strict loading."""
import re

import pytest
import torch

import eglp_dist  # noqa: F401
from eglp_dist.cli import main as cli_main
from eglp_dist.errors import UserError
from eglp_dist.models import build_segmentor, load_model_config
from eglp_dist.models.backbones import create_encoder, load_encoder_weights
from eglp_dist.models.convert import infer_mit_variant, to_timm_layout
from eglp_dist.models.convert_mit import convert_mit


def segformer_layout(timm_sd, num_classes=1000):
    """Rename timm pvt_v2 keys to SegFormer's mix_transformer.py names, written out here
    independently of the converter (the test checks the converter, not itself)."""
    out = {}
    for k, v in timm_sd.items():
        k = k.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")
        k = re.sub(r"^patch_embed\.", "patch_embed1.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", lambda m: f"patch_embed{int(m.group(1)) + 1}.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", lambda m: f"block{int(m.group(1)) + 1}.{m.group(2)}.", k)
        k = re.sub(r"^stages\.(\d+)\.norm\.", lambda m: f"norm{int(m.group(1)) + 1}.", k)
        out[k] = v.clone()
    width = out["norm4.weight"].shape[0]
    out["head.weight"] = torch.randn(num_classes, width)  # SegFormer's ImageNet classifier
    out["head.bias"] = torch.zeros(num_classes)
    return out


ORIGINAL_KEYS = [  # names as they appear in SegFormer's mit_b*.pth
    "patch_embed1.proj.weight", "patch_embed1.norm.weight", "patch_embed4.proj.weight",
    "block1.0.norm1.weight", "block1.0.attn.q.weight", "block1.0.attn.kv.weight",
    "block1.0.attn.sr.weight", "block1.0.attn.norm.weight", "block1.0.attn.proj.weight",
    "block1.0.mlp.fc1.weight", "block1.0.mlp.dwconv.dwconv.weight", "block1.0.mlp.fc2.weight",
    "block4.1.norm2.bias", "norm1.weight", "norm4.bias", "head.weight",
]


@pytest.fixture(scope="module")
def mit_b0_files(tmp_path_factory):
    torch.manual_seed(0)
    model = create_encoder("mit_b0").eval()
    folder = tmp_path_factory.mktemp("mit")
    src = folder / "mit_b0.pth"
    sd = segformer_layout(model.timm_state_dict())
    assert all(k in sd for k in ORIGINAL_KEYS)
    torch.save(sd, src)
    return model, src, folder


def test_convert_cli_then_strict_load_and_equal_outputs(mit_b0_files, capsys):
    model, src, folder = mit_b0_files
    dst = folder / "mit_b0_timm.pth"
    assert cli_main(["convert-mit", str(src), str(dst)]) == 0
    assert "mit_b0" in capsys.readouterr().out
    converted = torch.load(dst, weights_only=True)
    assert "stages.0.blocks.0.attn.q.weight" in converted and "head.weight" not in converted

    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
        for path in (src, dst):  # loading accepts either layout
            enc = create_encoder("mit_b0").eval()
            load_encoder_weights(enc, str(path))
            assert all(torch.equal(a, b) for a, b in zip(enc(x), ref))


def test_segmentor_pretrained_from_segformer_file(mit_b0_files):
    model, src, _ = mit_b0_files
    seg = build_segmentor(load_model_config("tiny_daformer", {"pretrained": str(src)}))
    for k, v in model.net.state_dict().items():
        assert torch.equal(seg.encoder.net.state_dict()[k], v)


def test_mit_b5_keys_and_shapes_convert_strictly():
    enc = create_encoder("mit_b5")
    sd = segformer_layout(enc.timm_state_dict())
    assert all(k in sd for k in ORIGINAL_KEYS) and "block3.39.attn.kv.weight" in sd
    timm_sd, origins = to_timm_layout(sd)
    assert infer_mit_variant(timm_sd) == "mit_b5"
    assert origins["stages.2.blocks.39.mlp.dwconv.weight"] == "block3.39.mlp.dwconv.dwconv.weight"
    assert set(timm_sd) == set(enc.timm_state_dict())
    enc.load_timm_state_dict(timm_sd, source="synthetic mit_b5.pth", origins=origins)  # strict


def test_whole_segmentor_checkpoint_is_unwrapped(mit_b0_files, tmp_path):
    """mmseg/DAFormer checkpoints: {'state_dict': {'backbone.*', 'decode_head.*'}, 'meta'}."""
    _, src, _ = mit_b0_files
    sd = torch.load(src, weights_only=True)
    wrapped = {"meta": {"iter": 40000, "CLASSES": ["road"]},
               "state_dict": {**{f"backbone.{k}": v for k, v in sd.items() if not k.startswith("head.")},
                              "decode_head.conv_seg.weight": torch.zeros(19, 256, 1, 1)}}
    path = tmp_path / "daformer_ckpt.pth"
    torch.save(wrapped, path)
    info = convert_mit(str(path), str(tmp_path / "out.pth"))
    assert info["variant"] == "mit_b0" and info["layout"] == "segformer"


def test_errors_name_the_file_and_key(mit_b0_files, tmp_path, capsys):
    _, src, _ = mit_b0_files
    sd = torch.load(src, weights_only=True)

    with pytest.raises(UserError, match="nope.pth: no such weight file"):
        convert_mit(str(tmp_path / "nope.pth"), str(tmp_path / "o.pth"))

    extra = dict(sd, **{"block1.0.attn.extra.weight": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(UserError, match=r"extra\.pth.*unexpected.*block1\.0\.attn\.extra\.weight"):
        convert_mit(str(tmp_path / "extra.pth"), str(tmp_path / "o.pth"))

    missing = {k: v for k, v in sd.items() if k != "block2.1.attn.q.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(UserError, match=r"missing.*stages\.1\.blocks\.1\.attn\.q\.bias"):
        convert_mit(str(tmp_path / "missing.pth"), str(tmp_path / "o.pth"))

    wrong = dict(sd, **{"block1.0.attn.q.weight": torch.zeros(32, 16)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match=r"wrong\.pth: block1\.0\.attn\.q\.weight has shape \(32, 16\)"):
        convert_mit(str(tmp_path / "wrong.pth"), str(tmp_path / "o.pth"))

    with pytest.raises(UserError, match="shape"):  # asked for b1 widths, file is b0
        convert_mit(str(src), str(tmp_path / "o.pth"), variant="mit_b1")

    # the CLI prints one line and exits 2; nothing half-written is left behind
    assert cli_main(["convert-mit", str(tmp_path / "wrong.pth"), str(tmp_path / "o.pth")]) == 2
    assert "block1.0.attn.q.weight" in capsys.readouterr().err
    assert not any(p.name.startswith(".o.pth") or p.name == "o.pth" for p in tmp_path.iterdir())
