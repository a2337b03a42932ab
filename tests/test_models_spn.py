"""SPN: multi-resolution encoder, MSFFP prompts only in training, reproducible randomness."""
import pytest
import torch

import eglp_dist  # noqa: F401
from eglp_dist.errors import ConfigError
from eglp_dist.models import build_segmentor, load_model_config
from eglp_dist.models.spn import high_frequency_prompt, statistics_prompt


def tiny_spn(**overrides):
    torch.manual_seed(0)
    return build_segmentor(load_model_config("tiny_spn", overrides))


def x_odd(seed=0):
    return torch.randn(2, 3, 67, 93, generator=torch.Generator().manual_seed(seed))


def encode(model, x, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        return model.encode(x, generator=g)


def freeze_bn(model):
    """Keep BN in eval so that only the prompts can make train-mode features differ."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()


def test_prompts_change_features_in_train_mode_only():
    model = tiny_spn(**{"spn.prompt_prob": 1.0})
    x = x_odd()
    model.eval()
    clean = encode(model, x)
    assert all(torch.equal(a, b) for a, b in zip(clean, encode(model, x, seed=1)))  # eval: never random
    model.train()
    freeze_bn(model)
    prompted = encode(model, x, seed=1)
    assert not torch.allclose(prompted[0], clean[0]) and not torch.allclose(prompted[1], clean[1])
    again = encode(model, x, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(prompted, again))  # same generator, same prompts
    assert not torch.allclose(encode(model, x, seed=2)[0], prompted[0])


def test_probability_zero_means_no_prompt():
    model = tiny_spn(**{"spn.prompt_prob": 0.0})
    x = x_odd()
    model.eval()
    clean = encode(model, x)
    model.train()
    freeze_bn(model)
    assert all(torch.equal(a, b) for a, b in zip(clean, encode(model, x, seed=3)))


def test_multi_resolution_encoder_on_odd_sizes_and_fusion_starts_as_mean():
    model = tiny_spn().eval()
    x = x_odd()
    feats = encode(model, x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(17, 24), (9, 12), (5, 6), (5, 6)]
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 19, 67, 93)
    # level 0 = mean of the full-resolution stream and the upsampled half-resolution stream
    enc = model.encoder.encoder
    full = enc.stage(0, x)
    half = enc.stage(0, torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear"))
    half = torch.nn.functional.interpolate(half, size=full.shape[-2:], mode="bilinear")
    assert torch.allclose(feats[0], (full + half) / 2, atol=1e-5)


def test_prompt_functions():
    f = torch.randn(4, 8, 11, 13)
    g = torch.Generator().manual_seed(0)
    hf = high_frequency_prompt(f, hidden=6, depth=2, scale=0.8, generator=g)
    assert hf.shape == f.shape and (hf >= 0).all()  # ends in ReLU
    # not a constant: it varies over the map and follows the content (random kernels drawn
    # again from the same seed on another input give another prompt), and a new draw of the
    # kernels gives another prompt for the same input
    assert hf.std() > 0 and (hf > 0).float().mean() > 0.1
    same_kernels = high_frequency_prompt(f.flip(-1), 6, 2, 0.8, torch.Generator().manual_seed(0))
    first = high_frequency_prompt(f, 6, 2, 0.8, torch.Generator().manual_seed(0))
    assert not torch.allclose(same_kernels, first)
    assert not torch.allclose(high_frequency_prompt(f, 6, 2, 0.8, torch.Generator().manual_seed(1)), first)
    s = statistics_prompt(f, 0.0, 0.0, generator=g)  # alpha = beta = 1: identity
    assert torch.allclose(s, f, atol=1e-6)
    s = statistics_prompt(f, 0.75, 0.75, generator=g)
    # alpha scales the centred part, beta the mean: per-channel means move, shapes stay
    assert s.shape == f.shape and not torch.allclose(s.mean((2, 3)), f.mean((2, 3)))
    assert torch.isfinite(statistics_prompt(f[:1], 0.75, 0.75, "np_plus", g)).all()  # batch of one


def test_spn_trains_and_fusion_weights_get_head_lr():
    model = tiny_spn().train()
    x = torch.randn(2, 3, 64, 64)
    seg = torch.randint(0, 19, (2, 64, 64))
    out = model(x, mode="train", generator=torch.Generator().manual_seed(0))
    model.losses(out, seg)["loss"].backward()
    fusion = model.encoder.fusions["0"].weight
    assert fusion.grad is not None
    groups = {g["name"]: g for g in model.param_groups(lr=0.01, weight_decay=5e-4)}
    assert any(p is fusion for p in groups["head"]["params"])


def test_bad_spn_config_is_named():
    with pytest.raises(ConfigError, match="model.spn.input_scales"):
        load_model_config("tiny_spn", {"spn.input_scales": [0.5, 1.0]})
    with pytest.raises(ConfigError, match="model.spn.prompt_levels"):
        load_model_config("tiny_spn", {"spn.prompt_levels": [4]})
