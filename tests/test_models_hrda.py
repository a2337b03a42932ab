"""HRDA: fusion identities, crop boxes from a seedable generator, sliding inference, losses."""
import pytest
import torch

import eglp_dist  # noqa: F401
from eglp_dist.errors import ConfigError
from eglp_dist.models import build_segmentor, load_model_config
from eglp_dist.models.heads import resize
from eglp_dist.models.hrda import draw_box
from eglp_dist.models.sliding import slide, window_boxes


def tiny_hrda(**overrides):
    torch.manual_seed(0)
    return build_segmentor(load_model_config("tiny_hrda", overrides))


def images(b=2, h=128, w=128, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


BOX = (32, 96, 56, 120)  # 64x64 detail crop, offsets multiples of 8


def test_attention_zero_gives_upsampled_context():
    model = tiny_hrda(**{"hrda.fixed_attention": 0.0}).eval()
    with torch.no_grad():
        out = model.forward_train(images(), box=BOX)
    assert torch.equal(out["logits"], resize(out["logits_lr"], out["logits"].shape[-2:]))


def test_attention_one_gives_detail_inside_box_context_outside():
    model = tiny_hrda(**{"hrda.fixed_attention": 1.0}).eval()
    with torch.no_grad():
        out = model.forward_train(images(), box=BOX)
    y1, y2, x1, x2 = (v // 4 for v in BOX)
    fused = out["logits"]
    assert torch.equal(fused[:, :, y1:y2, x1:x2], out["logits_hr"])
    outside = torch.ones_like(fused, dtype=torch.bool)
    outside[:, :, y1:y2, x1:x2] = False
    up_ctx = resize(out["logits_lr"], fused.shape[-2:])
    assert torch.equal(fused[outside], up_ctx[outside])


def test_learned_attention_is_masked_outside_the_box():
    model = tiny_hrda().eval()
    with torch.no_grad():
        out = model.forward_train(images(), box=BOX)
    y1, y2, x1, x2 = (v // 4 for v in BOX)
    fused, up_ctx = out["logits"], resize(out["logits_lr"], out["logits"].shape[-2:])
    assert torch.equal(fused[:, :, :y1], up_ctx[:, :, :y1])
    assert not torch.allclose(fused[:, :, y1:y2, x1:x2], up_ctx[:, :, y1:y2, x1:x2])
    assert out["attention"].shape[1] == 19  # class-wise attention


def test_detail_stride_only_at_multiples_and_generator_reproducible():
    boxes = [draw_box(128, 128, (64, 64), 8, torch.Generator().manual_seed(s)) for s in range(50)]
    assert all(b[0] % 8 == 0 and b[2] % 8 == 0 and b[1] - b[0] == 64 and b[1] <= 128 for b in boxes)
    assert len(set(boxes)) > 10
    model = tiny_hrda().train()
    x = images()
    a = model.forward_train(x, generator=torch.Generator().manual_seed(7))
    b = model.forward_train(x, generator=torch.Generator().manual_seed(7))
    assert a["box"] == b["box"]
    assert draw_box(40, 40, (64, 64), 8) == (0, 40, 0, 40)  # crop larger than image: whole image


def test_sliding_inference_over_one_window_equals_single_forward():
    model = tiny_hrda().eval()
    with torch.no_grad():
        x = images(h=64, w=64)  # = one detail window and smaller than the test window
        feats = model.encode(x)
        context = model.decode(feats)
        detail = model.detail_logits(x)  # one detail forward over the whole image
        single = resize(model.fuse(context, detail, model.attention(feats, context)), x.shape[-2:])
        assert torch.equal(model.predict(x), single)
        x = images(h=128, w=128)  # = one test window
        assert torch.equal(model(x), model.predict(x))


def test_slide_stitches_overlapping_windows_exactly():
    """A per-position function slid with overlap equals the function on the whole image."""
    x = torch.randn(2, 4, 96, 160)
    fn = lambda t: torch.nn.functional.avg_pool2d(t, 4)  # noqa: E731
    assert window_boxes(96, 160, (64, 64), (32, 32))[-1] == (32, 96, 96, 160)
    assert torch.allclose(slide(fn, x, (64, 64), (32, 32), out_stride=4), fn(x), atol=1e-6)
    assert torch.allclose(slide(fn, x, (64, 64), (32, 32), out_stride=4, batched=False), fn(x), atol=1e-6)


def test_whole_image_sliding_on_larger_images():
    model = tiny_hrda().eval()
    with torch.no_grad():
        out = model(images(b=1, h=128, w=256))
    assert out.shape == (1, 19, 128, 256)


def test_losses_are_0_9_fused_plus_0_1_detail_on_its_box():
    model = tiny_hrda().train()
    x = images()
    seg = torch.randint(0, 19, (2, 128, 128), generator=torch.Generator().manual_seed(1))
    seg[:, :10] = 255
    weight = torch.rand(2, 128, 128, generator=torch.Generator().manual_seed(2))
    out = model.forward_train(x, box=BOX)
    losses = model.losses(out, seg, weight)
    ce = model._ce
    y1, y2, x1, x2 = BOX
    assert torch.allclose(losses["loss_seg"], 0.9 * ce(out["logits"], seg, weight))
    assert torch.allclose(losses["loss_seg_hr"],
                          0.1 * ce(out["logits_hr"], seg[:, y1:y2, x1:x2], weight[:, y1:y2, x1:x2]))
    assert torch.allclose(losses["loss"], losses["loss_seg"] + losses["loss_seg_hr"])
    losses["loss"].backward()
    assert model.scale_attention.classifier.conv.weight.grad.abs().sum() > 0


def test_encode_is_the_context_view_used_for_feature_distance():
    model = tiny_hrda().eval()
    x = images()
    with torch.no_grad():
        feats = model.encode(x)
        out = model.forward_train(x, box=BOX)
    assert feats[0].shape[-2:] == (16, 16)  # 128 * 0.5 / 4
    assert all(torch.equal(a, b) for a, b in zip(feats, out["features"]))


def test_bad_config_and_box_are_named():
    with pytest.raises(ConfigError, match="model.hrda.crop_divisible"):
        load_model_config("tiny_hrda", {"hrda.crop_divisible": 6})
    with pytest.raises(ConfigError, match="model.hrda.context_scale"):
        load_model_config("tiny_hrda", {"hrda.context_scale": 1.5})
    with pytest.raises(ValueError, match="detail box"):
        tiny_hrda().forward_train(images(), box=(100, 164, 0, 64))
