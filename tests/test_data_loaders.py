"""Training streams and evaluation loaders, both backends: shapes, equal semantics, exact
resume, unlabelled streams, every-rank-same-batches and exactly-once evaluation on 2 ranks."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dist_harness import run_ranks
from eglp_dist.data.offline import synth
from eglp_dist.data.config import DataConfig, EvalStreamConfig
from eglp_dist.data.loader import build_eval_loader, build_train_stream
from eglp_dist.data.offline.pack import pack
from eglp_dist.data.shards import eval_range
from eglp_dist.errors import ConfigError, DataError
import numpy as np

BACKENDS = ["pil", "dali"]
LEVEL = 1.0 / 57.12  # one grey level after normalisation (smallest std)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Synthetic Cityscapes (train 10, val 7, test 3) packed into uneven shards."""
    base = tmp_path_factory.mktemp("loaders")
    synth.write_dataset("cityscapes", base / "cs", n=10, splits=["train"], size=(128, 64), seed=1)
    synth.write_dataset("cityscapes", base / "cs", n=7, splits=["val"], size=(128, 64), seed=2)
    synth.write_dataset("cityscapes", base / "cs", n=3, splits=["test"], size=(128, 64), seed=3)
    out = {}
    for split, size in (("train", 3), ("val", 2), ("test", 2)):
        out[split] = str(base / split)
        pack("cityscapes", base / "cs", split, out[split], shard_size=size, workers=1, progress=False)
    return out


def make_cfg(shards, backend="pil", **source):
    cfg = DataConfig(backend=backend, num_threads=2, prefetch=2, seed=0)
    for name in ("source", "target", "prompt"):
        s = getattr(cfg, name)
        s.shards, s.img_scale, s.ratio_range, s.crop_size = shards["train"], [128, 64], [0.5, 2.0], [32, 48]
    cfg.target.batch_size = 1
    for k, v in source.items():
        setattr(cfg.source, k, v)
    cfg.val["val"] = EvalStreamConfig(shards=shards["val"], img_scale=[64, 32])
    cfg.test.shards, cfg.test.img_scale = shards["test"], [64, 32]
    return cfg


def assert_same_pixels(a, b):
    """DALI and PIL resample alike up to rounding (1 grey level); only where the filter
    reaches past the image border (edge handling differs) may a few pixels differ more."""
    diff = (a - b).abs()
    assert (diff > LEVEL * 1.01).float().mean() < 0.02
    assert diff.mean() < LEVEL / 4


def take(stream, n):
    out = [next(stream) for _ in range(n)]
    stream.close()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_batches(shards, backend):
    cfg = make_cfg(shards, backend)
    batches = take(build_train_stream(cfg.source, cfg, 0, 1, seed=0), 3)
    for b in batches:
        assert b["img"].shape == (2, 3, 32, 48) and b["img"].dtype == torch.float32
        assert b["seg"].shape == (2, 32, 48) and b["seg"].dtype == torch.int64
        assert set(b["seg"].unique().tolist()) <= set(range(19)) | {255}
        assert len(b["meta"]) == 2 and {"key", "source", "index", "crop", "flip"} <= set(b["meta"][0])
        assert -2.2 < b["img"].min() and b["img"].max() < 2.7  # ImageNet-normalised
    again = take(build_train_stream(cfg.source, cfg, 0, 1, seed=0), 3)
    other_rank = take(build_train_stream(cfg.source, cfg, 1, 2, seed=0), 3)
    assert all(torch.equal(a["img"], b["img"]) and torch.equal(a["seg"], b["seg"])
               for a, b in zip(batches, again))
    assert [m["index"] for b in batches for m in b["meta"]] != \
        [m["index"] for b in other_rank for m in b["meta"]]


@pytest.mark.parametrize("augment", [False, True])
def test_dali_and_wds_give_the_same_training_batches(shards, augment):
    kw = {} if augment else dict(ratio_range=None, flip_prob=0.0, cat_max_ratio=1.0)
    got = {be: take(build_train_stream(make_cfg(shards, be, **kw).source, make_cfg(shards, be, **kw),
                                       0, 1, seed=4), 3) for be in BACKENDS}
    for a, b in zip(got["pil"], got["dali"]):
        assert torch.equal(a["seg"], b["seg"])  # same label tensor
        assert a["meta"] == b["meta"]
        assert_same_pixels(a["img"], b["img"])
        # the host label counts (from the prefetch threads) are those of the batch's labels
        for batch in (a, b):
            want = torch.stack([torch.bincount(s.flatten(), minlength=256) for s in batch["seg"]])
            assert batch["label_counts"].device.type == "cpu" and torch.equal(batch["label_counts"], want)


def test_dali_and_wds_give_the_same_evaluation_samples(shards):
    cfg = {be: make_cfg(shards, be) for be in BACKENDS}
    got = {be: list(build_eval_loader(cfg[be].val["val"], cfg[be], 0, 1)) for be in BACKENDS}
    assert len(got["pil"]) == len(got["dali"]) == 7
    for a, b in zip(got["pil"], got["dali"]):
        assert a["meta"] == b["meta"]
        assert torch.equal(a["seg"], b["seg"]) and a["seg"].shape == (1, 64, 128)  # original size
        assert a["img"].shape == b["img"].shape == (1, 3, 32, 64)  # resized to img_scale
        assert_same_pixels(a["img"], b["img"])
        assert (a["img"] - b["img"])[..., 1:-1, 1:-1].abs().max() <= LEVEL * 1.01  # interior


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_is_exact(shards, backend):
    cfg = make_cfg(shards, backend)
    cfg.source.sampling.mode, cfg.source.sampling.rcs_min_pixels = "rcs", 20
    full = take(build_train_stream(cfg.source, cfg, 1, 2, seed=7), 6)
    first = build_train_stream(cfg.source, cfg, 1, 2, seed=7)
    take(first, 2)
    state = first.state_dict()
    assert state["step"] == 2
    resumed = build_train_stream(cfg.source, cfg, 1, 2, seed=7)
    resumed.load_state_dict(state)
    rest = take(resumed, 4)
    for a, b in zip(full[2:], rest):
        assert torch.equal(a["img"], b["img"]) and torch.equal(a["seg"], b["seg"])
        assert a["meta"] == b["meta"]


def test_unlabelled_target_and_own_batch_size(shards):
    cfg = make_cfg(shards)
    (b,) = take(build_train_stream(cfg.target, cfg, 0, 1, seed=0), 1)
    assert "seg" not in b and b["img"].shape == (1, 3, 32, 48)
    test = list(build_eval_loader(cfg.test, cfg, 0, 1))
    assert len(test) == 3 and all("seg" not in b for b in test)
    assert all(b["meta"][0]["source"].startswith("leftImg8bit/test/") for b in test)


def test_small_images_are_padded_to_the_crop(shards):
    cfg = make_cfg(shards, crop_size=[80, 200], ratio_range=None)
    (b,) = take(build_train_stream(cfg.source, cfg, 0, 1, seed=0), 1)
    assert b["img"].shape == (2, 3, 80, 200)
    assert (b["seg"][:, 64:, :] == 255).all() and (b["seg"][:, :, 128:] == 255).all()
    assert (b["img"][:, :, 64:, :] == 0).all()


def test_eval_split_is_a_pure_function_of_rank():
    for n in (1, 2, 7, 10):
        for world in (1, 2, 3, 8):
            parts = [list(eval_range(n, r, world)) for r in range(world)]
            assert sorted(sum(parts, [])) == list(range(n))  # each exactly once, no padding
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert [list(eval_range(7, r, 2)) for r in (0, 1)] == [[0, 1, 2], [3, 4, 5, 6]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_ranks_are_disjoint_and_cover_the_split(shards, backend):
    cfg = make_cfg(shards, backend)
    keys = [[b["meta"][0]["key"] for b in build_eval_loader(cfg.val["val"], cfg, r, 2)] for r in (0, 1)]
    assert [len(k) for k in keys] == [3, 4]
    assert not set(keys[0]) & set(keys[1]) and len(set(keys[0]) | set(keys[1])) == 7


def _two_rank_worker(env, shards, backend):
    """One rank: 6 training steps with a collective per step (hangs if a rank ran dry),
    then this rank's evaluation keys."""
    import torch.distributed as tdist

    cfg = make_cfg(shards, backend)
    stream = build_train_stream(cfg.source, cfg, env.rank, env.world_size, seed=0)
    steps = 0
    for _ in range(6):  # 6 steps x 2 ranks x batch 2 = 24 samples from 10, over uneven shards
        batch = next(stream)
        n = torch.tensor([batch["img"].shape[0]])
        tdist.all_reduce(n)
        assert int(n) == 2 * env.world_size
        steps += 1
    stream.close()
    keys = [b["meta"][0]["key"] for b in build_eval_loader(cfg.val["val"], cfg, env.rank, env.world_size)]
    return steps, keys


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_processes_same_batches_and_exactly_once_eval(shards, backend):
    (s0, k0), (s1, k1) = run_ranks(_two_rank_worker, 2, args=(shards, backend))
    assert s0 == s1 == 6
    assert len(k0) + len(k1) == 7 and not set(k0) & set(k1)


def test_config_and_data_errors_name_the_key_or_file(shards, tmp_path):
    cfg = make_cfg(shards)
    cfg.source.crop_size = [0, 10]
    with pytest.raises(ConfigError, match=r"data\.source\.crop_size"):
        build_train_stream(cfg.source, cfg)
    cfg = make_cfg(shards)
    cfg.source.shards = shards["test"]  # unlabelled shards for a labelled stream
    with pytest.raises(ConfigError, match=r"data\.source\.with_labels"):
        build_train_stream(cfg.source, cfg)
    cfg.source.shards = str(tmp_path)
    with pytest.raises(DataError, match="manifest.json"):
        build_train_stream(cfg.source, cfg)
    cfg = make_cfg(shards)
    cfg.prompt.shards = ""
    with pytest.raises(ConfigError, match=r"data\.prompt\.shards"):
        build_train_stream(cfg.prompt, cfg)


def test_dictconfig_from_yaml_works_like_the_dataclass(shards):
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.create({
        "num_threads": 2, "source": {"shards": shards["train"], "img_scale": [128, 64],
                                     "crop_size": [32, 48], "sampling": {"mode": "class_uniform"}},
        "val": {"night": {"shards": shards["val"], "img_scale": [64, 32]}}}))
    (b,) = take(build_train_stream(cfg.source, cfg, 0, 1), 1)
    assert b["img"].shape == (2, 3, 32, 48) and b["meta"][0]["step"] == 0
    assert len(build_eval_loader(cfg.val.night, cfg, 0, 1)) == 7


def test_bad_values_are_rejected_naming_the_key(tmp_path):
    from eglp_dist.config import load_config

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo" / "tiny_source_only.yaml"
    cfg = load_config(demo, ["data.backend=dali", "data.source.sampling.mode=rcs",
                             "data.source.crop_size=[512,1024]"])
    assert cfg.data.backend == "dali" and cfg.data.source.sampling.mode == "rcs"
    for override, key in (("data.backend=tfrecord", "data.backend"),
                          ("data.source.sampling.mode=often", "data.source.sampling.mode"),
                          ("data.val.acdc_night.img_scale=[0,1]", "data.val.acdc_night.img_scale"),
                          ("data.source.cat_max_ratio=-1", "data.source.cat_max_ratio")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(demo, [override])
    # what relates several keys is checked when a loader is built
    cfg = DataConfig()
    cfg.source.ratio_range = [2.0, 0.5]
    with pytest.raises(ConfigError, match=r"data\.source\.ratio_range"):
        build_train_stream(cfg.source, cfg)


# ------------------------------------------------------------------ resize filter (mmcv's cv2)

def test_resampling_is_mmcvs_cv2_inter_linear_and_inter_nearest_by_default():
    """DAFormer/HRDA's Resize is mmcv.imrescale = cv2.resize INTER_LINEAR (no antialiasing)
    for images and INTER_NEAREST for labels; a resized-then-cropped sample must be the same
    pixels, bit for bit, though the pil back-end resizes only the part the crop reaches."""
    import io

    import cv2
    from PIL import Image

    from eglp_dist.data.augment import Geometry, crop_label
    from eglp_dist.data.config import DataConfig
    from eglp_dist.data.pil import resample

    assert DataConfig().resample == "mmcv"
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    lab = rng.integers(0, 19, (300, 500), dtype=np.uint8)
    # 2x down (cv2's area fast path), odd down, up, 2x up; a scale so near 1 that the part
    # resized keeps its size (cv2 would copy it); then random sizes and crops, crops at every
    # edge included (the part resized must not clamp where the image does not)
    cases = [(150, 250, 17, 23, 100, 128), (137, 229, 17, 23, 100, 128), (611, 1003, 17, 23, 100, 128),
             (600, 1000, 0, 0, 100, 128), (300, 501, 10, 20, 50, 60)]
    for i in range(40):
        H, W = int(rng.integers(40, 700)), int(rng.integers(60, 1100))
        h, w = min(int(rng.integers(8, 160)), H), min(int(rng.integers(8, 160)), W)
        top = [0, H - h, int(rng.integers(0, H - h + 1))][i % 3]
        left = [W - w, 0, int(rng.integers(0, W - w + 1))][i % 3]
        cases.append((H, W, top, left, h, w))
    for H, W, top, left, h, w in cases:
        sy, sx = H / 300, W / 500
        box = (left / sx, top / sy, (left + w) / sx, (top + h) / sy)
        ref = cv2.resize(img, (W, H), interpolation=cv2.INTER_LINEAR)[top:top + h, left:left + w]
        for flip in (False, True):
            ours = resample(buf.getvalue(), Geometry(box, (h, w), (h, w), (H, W), (top, left), flip))
            assert np.array_equal(ours, ref[:, ::-1] if flip else ref), (H, W, top, left, h, w, flip)
        ref_lab = cv2.resize(lab, (W, H), interpolation=cv2.INTER_NEAREST)[top:top + h, left:left + w]
        assert np.array_equal(crop_label(lab, (H, W), top, left, (h, w)), ref_lab)
    # the other convention stays available: antialiased when shrinking, so it differs from cv2
    whole = Geometry((0.0, 0.0, 500.0, 300.0), (150, 250), (150, 250), (150, 250), (0, 0), False)
    anti = resample(buf.getvalue(), whole, mode="antialias")
    assert np.abs(anti.astype(int) - cv2.resize(img, (250, 150), interpolation=cv2.INTER_LINEAR).astype(int)).max() > 5
