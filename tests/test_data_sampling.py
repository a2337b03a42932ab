"""Sampling from manifest statistics: DAFormer RCS, class-uniform crops, uniform epochs."""
import numpy as np
import pytest

from eglp_dist.data.offline import synth
from eglp_dist.data.augment import Augmenter, rescale_hw
from eglp_dist.data.config import DataConfig, StreamConfig
from eglp_dist.data.loader import build_train_stream
from eglp_dist.data.offline.pack import pack
from eglp_dist.data.sampling import (ClassUniformSampler, Pick, RareClassSampler, UniformSampler,
                                     rcs_class_probs)
from eglp_dist.config import PACKAGE_CONFIG_ROOT, load_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    base = tmp_path_factory.mktemp("sampling")
    synth.write_dataset("cityscapes", base / "cs", n=16, splits=["train"], size=(128, 64), seed=5)
    pack("cityscapes", base / "cs", "train", base / "train", shard_size=5, workers=1, progress=False)
    return str(base / "train")


def test_rcs_class_probs_follow_daformer():
    counts = [1000, 0, 10, 500]
    classes, p = rcs_class_probs(counts, 0.01)
    assert classes.tolist() == [0, 2, 3]  # classes absent from the data are not sampled
    f = np.array([1000, 10, 500]) / 1510
    e = np.exp((1 - f) / 0.01 - ((1 - f) / 0.01).max())
    assert np.allclose(p, e / e.sum())
    assert p[1] > p[2] > p[0]  # the rarer, the likelier
    _, hot = rcs_class_probs(counts, 100.0)
    assert np.allclose(hot, 1 / 3, atol=0.01)  # high temperature -> uniform


def test_rcs_sampler_picks_images_with_enough_pixels():
    per = np.array([[5000, 0, 10], [100, 4000, 0], [6000, 3500, 3100]])
    s = RareClassSampler(per, per.sum(0), temperature=0.01, min_pixels=3000)
    assert {c: v.tolist() for c, v in s.candidates.items()} == {0: [0, 2], 1: [1, 2], 2: [2]}
    rng = np.random.default_rng(0)
    picks = [s.pick(0, i, rng) for i in range(2000)]
    assert all(per[p.index, p.cls] > 3000 for p in picks)
    freq = np.bincount([p.cls for p in picks], minlength=3) / len(picks)
    assert np.allclose(freq, s.probs, atol=0.04)


def test_rcs_stream_crops_contain_the_rare_class(shards):
    cfg = DataConfig(num_threads=2)
    cfg.source = StreamConfig(shards=shards, batch_size=4, img_scale=[128, 64], ratio_range=[0.5, 2.0],
                              crop_size=[32, 32])
    cfg.source.sampling.mode, cfg.source.sampling.rcs_min_pixels = "rcs", 30
    stream = build_train_stream(cfg.source, cfg, seed=0)
    ok = total = 0
    classes = []
    for _ in range(10):
        b = next(stream)
        for seg, m in zip(b["seg"], b["meta"]):
            classes.append(m["sampled_class"])
            total += 1
            ok += int((seg == m["sampled_class"]).sum()) > 15  # min_crop_ratio 0.5 x 30
    stream.close()
    assert ok / total > 0.8  # up to 10 re-crops make this the rule, not the exception
    assert len(set(classes)) >= 4


def test_class_uniform_crops_are_centred_on_the_class():
    lab = np.zeros((64, 128), np.uint8)
    lab[40:44, 100:104] = 7  # a small sign in a corner
    cfg = StreamConfig(img_scale=None, crop_size=[16, 16], cat_max_ratio=1.0, flip_prob=0.0)
    aug = Augmenter(cfg)
    rng = np.random.default_rng(0)
    for _ in range(20):
        geom, seg = aug.draw(rng, lab.shape, lab, Pick(0, 7, centre=True))
        assert (seg == 7).sum() >= 4
    per = np.array([[100, 0], [50, 7], [0, 0]])
    s = ClassUniformSampler(per, pct=1.0, uniform=UniformSampler(3, 1, 0, 1, 0))
    picks = [s.pick(0, 0, rng) for _ in range(200)]
    assert {p.index for p in picks if p.cls == 1} == {1} and all(p.centre for p in picks)
    assert abs(np.mean([p.cls for p in picks]) - 0.5) < 0.1  # classes drawn uniformly


def test_uniform_sampler_epochs_are_disjoint_across_ranks():
    n, b, world = 12, 2, 3
    samplers = [UniformSampler(n, b, r, world, seed=1) for r in range(world)]
    rng = np.random.default_rng(0)
    epoch0 = [s.pick(step, i, rng).index for step in range(2) for s in samplers for i in range(b)]
    assert sorted(epoch0) == list(range(n))  # one epoch: every sample once over all ranks
    epoch1 = [s.pick(step, i, rng).index for step in range(2, 4) for s in samplers for i in range(b)]
    assert sorted(epoch1) == list(range(n)) and epoch1 != epoch0  # reshuffled per epoch


def test_cat_max_ratio_avoids_single_class_crops():
    lab = np.zeros((64, 128), np.uint8)
    lab[:, 100:] = 10  # the left 100 columns are all road
    aug = Augmenter(StreamConfig(img_scale=None, crop_size=[32, 32], cat_max_ratio=0.75, flip_prob=0.0))
    rng = np.random.default_rng(0)
    fracs = []
    for _ in range(50):
        _, seg = aug.draw(rng, lab.shape, lab)
        fracs.append(np.bincount(seg.ravel(), minlength=256).max() / seg.size)
    assert np.mean(np.array(fracs) < 0.75) > 0.8  # unconstrained, ~75% of crops would be all road


def test_rescale_follows_mmseg_keep_ratio():
    assert rescale_hw((1024, 2048), [2048, 1024]) == (1024, 2048)
    assert rescale_hw((1024, 2048), [1024, 512]) == (512, 1024)
    assert rescale_hw((1052, 1914), [1280, 720]) == (704, 1280)  # GTA5 in DAFormer
    assert rescale_hw((1024, 2048), [2048, 1024], 0.5) == (512, 1024)
    assert rescale_hw((1200, 900), [2048, 1024]) == (1365, 1024)  # portrait: short edge bound


def test_rare_class_sampling_tries_the_first_crop_and_ten_more_as_daformer():
    """DAFormer's uda_dataset.py: one crop, then `for j in range(10)` re-crops (11 in all)."""
    cfg = load_config(PACKAGE_CONFIG_ROOT / "demo" / "tiny_source_only.yaml",
                      ["data.source.sampling.mode=rcs", "data.source.ratio_range=null"]).data.source
    aug = Augmenter(cfg, min_class_pixels=10 ** 9)  # never satisfied: every try is made
    calls = []
    inner = aug._crop

    def counting(*args, **kw):
        calls.append(1)
        return inner(*args, **kw)

    aug._crop = counting
    label = np.zeros((128, 256), np.uint8)
    label[:8, :8] = 13
    aug.draw(np.random.default_rng(0), (128, 256), label, Pick(0, 13))
    assert len(calls) == 11
