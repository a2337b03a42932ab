"""SPN's recipe: class-uniform sampling (statistically), RobustNet's augmentation (against
scipy and torchvision), prompts off in evaluation, multi-target evaluation (one row per
target, Synthia's class subsets, 2 ranks == 1 rank, `eglp eval --targets`), streams over
several shard folders, old single-stream configs refused with the fix, exact resume."""
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage, stats

from dist_harness import run_ranks
from training_runs import assert_resume_exact
from eglp_dist.config import PACKAGE_CONFIG_ROOT, load_config
from eglp_dist.data.labels import SYNTHIA_13_CLASSES, SYNTHIA_16_CLASSES
from eglp_dist.data.sampling import ClassUniformSampler, UniformSampler
from eglp_dist.errors import ConfigError

TINY_SPN = PACKAGE_CONFIG_ROOT / "demo" / "tiny_spn.yaml"
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


# ------------------------------------------------------------------ class-uniform sampling

def _skewed_manifest():
    """40 images; class c of the 6 present classes is in 40, 20, 10, 4, 2, 1 images."""
    per = np.zeros((40, 19), np.int64)
    for c, n in zip((0, 2, 8, 11, 13, 17), (40, 20, 10, 4, 2, 1)):
        per[:n, c] = 100
    return per


def _tolerance(n: int, p: float, cells: int, alpha: float = 1e-6) -> float:
    """Half-width for every one of ``cells`` binomial(n, p) counts to hold jointly with
    probability >= 1 - alpha (two-sided normal bound, Bonferroni over the cells)."""
    z = stats.norm.isf(alpha / (2 * cells))
    return z * np.sqrt(n * p * (1 - p))


def test_class_uniform_sampling_draws_classes_uniformly_from_a_skewed_manifest():
    per = _skewed_manifest()
    present = [0, 2, 8, 11, 13, 17]
    n = 6000
    sampler = ClassUniformSampler(per, 1.0, UniformSampler(40, 1, 0, 1, 0))
    rng = np.random.default_rng(0)
    picks = [sampler.pick(i, 0, rng) for i in range(n)]
    counts = np.array([sum(p.cls == c for p in picks) for c in present])
    tol = _tolerance(n, 1 / 6, len(present))
    assert np.all(np.abs(counts - n / 6) <= tol), (counts, tol)
    assert all(per[p.index, p.cls] > 0 and p.centre for p in picks)  # an image holding the class
    # the class in one image of 40 gets a sixth of the picks (uniform images would give 1/40)
    assert counts[-1] > n / 6 - tol > n / 40
    # and each class's images are drawn uniformly: class 2's 20 images
    idx = np.array([p.index for p in picks if p.cls == 2])
    hist = np.bincount(idx, minlength=20)[:20]
    assert np.all(np.abs(hist - len(idx) / 20) <= _tolerance(len(idx), 1 / 20, 20))


def test_class_uniform_share_follows_the_configured_percentage():
    per = _skewed_manifest()
    n = 4000
    sampler = ClassUniformSampler(per, 0.5, UniformSampler(40, 1, 0, 1, 0))
    rng = np.random.default_rng(1)
    share = sum(sampler.pick(i, 0, rng).cls >= 0 for i in range(n))
    assert abs(share - n / 2) <= _tolerance(n, 0.5, 1)


# ------------------------------------------------------------------ RobustNet's augmentation

def test_blur_is_scipys_gaussian_filter_with_nearest_borders():
    from eglp_dist.methods.parts.dg_aug import gaussian_blur_nearest

    img = torch.rand(3, 40, 56, dtype=torch.float64)
    for sigma in (0.15, 0.7, 1.3):
        ours = gaussian_blur_nearest(img, sigma).numpy()
        ref = np.stack([ndimage.gaussian_filter(c, sigma, mode="nearest", truncate=4.0) for c in img.numpy()])
        assert np.allclose(ours, ref, atol=1e-10), sigma


def test_photometric_augmentation_is_torchvisions_jitter_and_replays_from_the_generator():
    import eglp_dist  # noqa: F401  (torchvision import shim)
    from torchvision.transforms.v2 import functional as TF

    from eglp_dist.methods.config import DGAugConfig
    from eglp_dist.methods.parts.dg_aug import N_UNIFORMS, photometric_augment

    cfg = DGAugConfig(jitter_p=1.0, blur_p=0.0)
    x01 = torch.rand(2, 3, 16, 16)
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    img = (x01 * 255 - m) / s
    out = photometric_augment(img, MEAN, STD, torch.Generator().manual_seed(3), cfg)
    again = photometric_augment(img, MEAN, STD, torch.Generator().manual_seed(3), cfg)
    assert torch.equal(out, again) and not torch.allclose(out, img)
    u = torch.rand((2, N_UNIFORMS), generator=torch.Generator().manual_seed(3)).double()
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(2):
        f = [1 + 0.4 * (2 * float(u[i, 2 + j]) - 1) for j in range(3)] + [0.1 * (2 * float(u[i, 5]) - 1)]
        assert all(0.6 <= v <= 1.4 for v in f[:3]) and -0.1 <= f[3] <= 0.1
        y = x01[i]
        for op in torch.argsort(u[i, 6:10]).tolist():
            y = ops[op](y, f[op])
        assert torch.allclose(out[i], (y * 255 - m[0]) / s[0], atol=1e-4)
    off = DGAugConfig(jitter_p=0.0, blur_p=0.0)
    assert torch.equal(photometric_augment(img, MEAN, STD, torch.Generator(), off), img)


def test_bad_augmentation_values_name_the_key():
    from eglp_dist.methods.spn import check_dg_aug

    for override, key in (("method.dg_aug.jitter_p=1.5", "jitter_p"), ("method.dg_aug.hue=0.7", "hue")):
        with pytest.raises(ConfigError, match=f"method.dg_aug.{key}"):
            load_config(TINY_SPN, [override])  # field rules, at load
    cfg = load_config(TINY_SPN, ["method.dg_aug.blur_sigma=[1.0,0.5]"])
    with pytest.raises(ConfigError, match="method.dg_aug.blur_sigma"):
        check_dg_aug(cfg.method.dg_aug)


# ------------------------------------------------------------------ data: DG shards

@pytest.fixture(scope="module")
def dg(tmp_path_factory):
    from eglp_dist.demo import prepare_dg_data

    return prepare_dg_data(tmp_path_factory.mktemp("dg"), n_train=6, n_val=4, size=(128, 64))


def test_prompts_act_in_training_and_never_in_evaluation(dg):
    from eglp_dist.data.loader import build_eval_loader
    from eglp_dist.evaluate import evaluate
    from eglp_dist.models import build_segmentor

    cfg = load_config(TINY_SPN, [f"data.val.day.shards={dg['cityscapes_val']}", "model.spn.prompt_prob=1.0"])
    torch.manual_seed(0)
    model = build_segmentor(cfg.model)
    x = torch.randn(2, 3, 64, 64)  # (batch 2: the ASPP's pooled batch norm in training)
    model.train()
    a = model(x, mode="train", generator=torch.Generator().manual_seed(1))["logits"]
    b = model(x, mode="train", generator=torch.Generator().manual_seed(2))["logits"]
    assert not torch.allclose(a, b)  # prompts drawn from the generator change the features
    loader = build_eval_loader(cfg.data.val.day, cfg.data, 0, 1, "cpu")
    torch.manual_seed(5)
    first = evaluate(model, loader, "cpu")
    torch.manual_seed(6)  # other global RNG state: nothing random in evaluation
    second = evaluate(model, loader, "cpu")
    assert torch.equal(first.confusion, second.confusion) and first.confusion.sum() > 0


def _targets_worker(env, config, overrides, ckpt_dir):
    """Every target of the config evaluated with the untrained tiny SPN; rank 0 also runs
    `eglp eval` on the saved weights."""
    from eglp_dist.data.loader import build_eval_loader
    from eglp_dist.evaluate import evaluate_targets, format_targets, run_cli
    from eglp_dist.models import build_segmentor

    import argparse

    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    model = build_segmentor(cfg.model)
    loaders = {n: build_eval_loader(t, cfg.data, env.rank, env.world_size, "cpu") for n, t in cfg.data.val.items()}
    results = evaluate_targets(model, loaders, "cpu")
    out = {"confusion": {n: r.metrics.confusion for n, r in results.items()},
           "headline": {n: r.headline for n, r in results.items()},
           "table": format_targets(results), "sizes": {n: len(loader) for n, loader in loaders.items()}}
    if ckpt_dir:
        weights = Path(ckpt_dir) / "model.pt"
        if env.rank == 0:
            torch.save(model.state_dict(), weights)
        from eglp_dist.runtime import comm

        comm.barrier()
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            run_cli(argparse.Namespace(config=str(config), checkpoint=str(weights), overrides=list(overrides),
                                       local_rank=None, targets=["night", "synthia"]))
        out["cli"] = buf.getvalue()
    return out


def _target_overrides(dg):
    return [f"data.val.day.shards={dg['cityscapes_val']}", f"data.val.night.shards={dg['acdc_night_val']}",
            f"data.val.fog.shards={dg['foggy_cityscapes_val']}", f"data.val.rain.shards={dg['rain_cityscapes_val']}",
            f"data.val.synthia.shards={dg['synthia_val']}", "data.val.synthia.img_scale=[128,64]",
            "data.val.synthia.class_sets=[synthia16,synthia13]"]


def test_multi_target_evaluation_rows_synthia_subsets_and_two_ranks_equal_one(dg, tmp_path):
    (one,) = run_ranks(_targets_worker, 1, args=(TINY_SPN, _target_overrides(dg), None))
    two = run_ranks(_targets_worker, 2, args=(TINY_SPN, _target_overrides(dg), str(tmp_path)))
    names = ["day", "night", "fog", "rain", "synthia"]
    assert list(one["confusion"]) == names
    for n in names:  # all-reduced once: every rank holds the matrix of the whole target
        assert torch.equal(one["confusion"][n], two[0]["confusion"][n])
        assert torch.equal(two[0]["confusion"][n], two[1]["confusion"][n])
        assert sum(r["sizes"][n] for r in two) == one["sizes"][n] == 4
    from eglp_dist.metrics import metrics_from_confusion

    m = metrics_from_confusion(one["confusion"]["synthia"])
    assert one["headline"]["synthia"] == pytest.approx(m.miou_over(SYNTHIA_16_CLASSES))
    assert one["headline"]["day"] == pytest.approx(metrics_from_confusion(one["confusion"]["day"]).miou)
    rows = one["table"].splitlines()
    assert [r.split()[0] for r in rows[2:7]] == names and rows[-1].startswith("average")
    avg = float(rows[-1].split()[-1])
    assert avg == pytest.approx(100 * np.mean(list(one["headline"].values())), abs=0.006)
    syn = next(r for r in rows if r.startswith("synthia"))
    assert "synthia16" in syn and f"synthia13 {100 * m.miou_over(SYNTHIA_13_CLASSES):.2f}" in syn
    cli = two[0]["cli"]
    assert "== night" in cli and "== synthia" in cli and "== day" not in cli and "mIoU synthia13" in cli
    result = json.loads((tmp_path / "model.eval_val.json").read_text())
    assert list(result["targets"]) == ["night", "synthia"]
    assert result["targets"]["synthia"]["mIoU"] == result["targets"]["synthia"]["mIoU_synthia16"]
    assert result["mIoU"] == pytest.approx(np.mean([result["targets"][n]["mIoU"] for n in ("night", "synthia")]))
    assert "" == two[1]["cli"]  # rank 0 prints


def test_unknown_target_and_no_target_are_named():
    from eglp_dist.cli_session import eval_targets

    cfg = load_config(TINY_SPN, ["data.val.day.shards=x"])
    with pytest.raises(ConfigError, match="data.val.dusk"):
        eval_targets(cfg, ["dusk"])
    with pytest.raises(ConfigError, match="no evaluation target has shards"):
        eval_targets(load_config(TINY_SPN))


def test_old_single_stream_val_key_is_refused_with_the_new_spelling(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.val\.val\.shards"):
        load_config(TINY_SPN, ["data.val.shards=s/acdc_val"])
    old = tmp_path / "old.yaml"
    old.write_text(f"defaults: [{TINY_SPN}]\ndata:\n  val: {{img_scale: [96, 48]}}\n")
    with pytest.raises(ConfigError, match=r"data\.val\.NAME\.img_scale"):
        load_config(old)
    with pytest.raises(ConfigError, match="data.val.day.class_sets"):
        load_config(TINY_SPN, ["data.val.day.class_sets=[synthia12]"])


# ------------------------------------------------------------------ several shard folders

def test_a_stream_over_two_folders_sees_every_sample_of_both(dg):
    from eglp_dist.data.loader import build_eval_loader, build_train_stream

    folders = [dg["foggy_cityscapes_val"], dg["rain_cityscapes_val"]]
    both = "[" + ",".join(map(str, folders)) + "]"
    cfg = load_config(TINY_SPN, [f"data.source.shards={both}", "data.source.batch_size=2",
                                 "data.source.sampling.mode=uniform", f"data.val.both.shards={both}"])
    keys = {json.loads(Path(f, "manifest.json").read_text())["dataset"]:
            [s["key"] for s in json.loads(Path(f, "manifest.json").read_text())["samples"]] for f in folders}
    assert len(keys) == 2 and all(len(k) == 4 for k in keys.values())
    expected = sorted((d, k) for d, ks in keys.items() for k in ks)
    stream = build_train_stream(cfg.data.source, cfg.data, 0, 1, seed=0)
    seen = sorted((m["dataset"], m["key"]) for _ in range(4) for m in next(stream)["meta"])
    stream.close()
    assert seen == expected  # one epoch of uniform sampling = every sample of both, once
    parts = [[(b["meta"][0]["dataset"], b["meta"][0]["key"])
              for b in build_eval_loader(cfg.data.val.both, cfg.data, r, 2, "cpu")] for r in (0, 1)]
    assert sorted(parts[0] + parts[1]) == expected and not set(parts[0]) & set(parts[1])
    with pytest.raises(ConfigError, match="data.source.shards: lists a folder twice"):
        load_config(TINY_SPN, [f"data.source.shards=[{folders[0]},{folders[0]}]"])


def test_all_conditions_acdc_config_reads_four_folders_per_stream():
    cfg = load_config(PACKAGE_CONFIG_ROOT / "uda" / "hrda_cs2acdc.yaml")
    assert len(cfg.data.target.shards) == 4 and len(cfg.data.val.acdc.shards) == 4
    assert [n for n, t in cfg.data.val.items() if t.shards] == ["acdc"]


# ------------------------------------------------------------------ shipped configs

def test_gta2all_configs_evaluate_six_targets_and_differ_only_in_spn():
    spn = load_config(PACKAGE_CONFIG_ROOT / "spn" / "gta2all.yaml")
    base = load_config(PACKAGE_CONFIG_ROOT / "spn" / "gta2all_baseline.yaml")
    targets = ["cityscapes", "bdd100k", "mapillary", "synthia", "rain_cityscapes", "foggy_cityscapes"]
    assert list(spn.data.val) == targets == list(base.data.val)
    assert list(spn.data.val.synthia.class_sets) == ["synthia16", "synthia13"]
    assert spn.method.name == "spn" and spn.optim.name == "sgd" and spn.optim.lr == pytest.approx(0.01)
    assert spn.optim.weight_decay == pytest.approx(5e-4) and spn.schedule.power == pytest.approx(0.9)
    assert spn.data.source.sampling.mode == "class_uniform" and spn.data.source.sampling.class_uniform_pct == 0.5
    assert list(spn.data.source.crop_size) == [768, 768] and list(spn.data.source.ratio_range) == [0.5, 2.0]
    assert spn.model.spn.enabled and not base.model.spn.enabled
    from omegaconf import OmegaConf

    a, b = OmegaConf.to_container(spn), OmegaConf.to_container(base)
    for d in (a, b):
        d["run"].pop("name"), d["model"].pop("name"), d["model"].pop("spn")
    assert a == b


# ------------------------------------------------------------------ exact resume

@pytest.mark.slow  # the UDA/PIG/EGLP resume tests cover the mechanism in the default run; CI runs this
def test_spn_resume_is_exact_on_two_ranks(dg, tmp_path):
    """Prompts on every step (``prompt_prob=1``): SPN's draws come from the method's generator."""
    folders = {"data.source": dg["gta5_train"], "data.val.day": dg["cityscapes_val"]}
    assert_resume_exact(TINY_SPN, "demo_spn", tmp_path, folders, "model.spn.prompt_prob=1.0")
