"""Every shipped config loads, and the UDA baselines hold the published DAFormer/HRDA values
(sources: docs/baselines.md). Fast: nothing is built, no weight file is read."""
from pathlib import Path

import pytest

from eglp_dist.config import load_config
from eglp_dist.data.config import check_data_config
from eglp_dist.methods.config import DAFORMER_FD_CLASSES
from eglp_dist.models.config import as_model_config, load_model_config

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
BASE = CONFIGS / "base.yaml"
# Group folders: their files are fragments of one node (`model:`, `engine:`), merged through
# `defaults: [GROUP: NAME]` or `GROUP=NAME`, not run configs of their own.
GROUPS = ("model", "engine")

RUN_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml")
                     if p.relative_to(CONFIGS).parts[0] not in GROUPS)
GROUP_NODES = sorted((g, p.stem) for g in GROUPS for p in (CONFIGS / g).glob("*.yaml"))
UDA = CONFIGS / "uda"


def _id(path):
    return str(path.relative_to(CONFIGS))


def test_the_uda_baselines_are_collected():
    names = {p.name for p in RUN_CONFIGS if p.parent == UDA}
    assert names >= {"daformer_cs2acdc_night.yaml", "hrda_cs2acdc_night.yaml",
                     "hrda_cs2darkzurich.yaml", "hrda_gta2cs.yaml", "source_only_cs_hrda.yaml"}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=_id)
def test_run_config_loads_and_validates(path):
    cfg = load_config(path)
    check_data_config(cfg.data)  # what relates several data keys (checked when loaders are built)
    as_model_config(cfg.model)  # model cross-field rules, without building the network
    assert cfg.engine.kind in ("ddp", "zero1", "zero2")


@pytest.mark.parametrize("group,name", GROUP_NODES, ids=lambda v: str(v))
def test_group_node_loads_through_the_group_mechanism(group, name):
    cfg = load_config(BASE, [f"{group}={name}"])
    if group == "model":
        assert cfg.model.name == load_model_config(name).name
    else:
        assert cfg.engine.kind == name


# -------------------------------------------------------------------- published values

def _load(name, *overrides):
    return load_config(UDA / name, list(overrides))


def _stream(s):
    return dict(batch_size=s.batch_size, img_scale=list(s.img_scale),
                ratio_range=None if s.ratio_range is None else list(s.ratio_range),
                crop_size=None if s.crop_size is None else list(s.crop_size),
                cat_max_ratio=s.cat_max_ratio, flip_prob=s.flip_prob)


HRDA = ["hrda_cs2acdc_night.yaml", "hrda_cs2darkzurich.yaml", "hrda_gta2cs.yaml"]
UDA_FILES = HRDA + ["daformer_cs2acdc_night.yaml"]


@pytest.mark.parametrize("name", UDA_FILES + ["source_only_cs_hrda.yaml"])
def test_shared_daformer_recipe(name):
    cfg = _load(name)
    assert cfg.model.encoder == "mit_b5" and cfg.model.num_classes == 19
    assert cfg.model.pretrained == "pretrained/mit_b5_timm.pth"  # `eglp convert-mit` output
    assert cfg.model.drop_path_rate == pytest.approx(0.1)
    assert cfg.model.loss_avg_non_ignore is False
    assert cfg.optim.name == "adamw" and cfg.optim.lr == pytest.approx(6e-5)
    assert list(cfg.optim.betas) == [0.9, 0.999] and cfg.optim.weight_decay == pytest.approx(0.01)
    assert cfg.optim.head_lr_mult == pytest.approx(10.0)
    assert cfg.schedule.warmup_iters == 1500 and cfg.schedule.warmup_ratio == pytest.approx(1e-6)
    assert cfg.schedule.power == pytest.approx(1.0) and cfg.schedule.min_lr_ratio == 0.0
    assert cfg.trainer.max_iters == 40000 and cfg.trainer.eval_interval == 4000
    assert cfg.engine.precision == "fp32" and cfg.engine.grad_clip is None and cfg.engine.grad_accum == 1
    assert cfg.data.source.batch_size == 2 and cfg.data.source.flip_prob == pytest.approx(0.5)
    assert cfg.data.source.cat_max_ratio == pytest.approx(0.75) and cfg.data.source.ratio_range is None
    assert list(cfg.data.mean) == [123.675, 116.28, 103.53] and list(cfg.data.std) == [58.395, 57.12, 57.375]
    # evaluation: one target of whole images resized (keep ratio); eval streams have no
    # crop/flip/ratio keys at all
    (target,) = cfg.data.val.values()
    assert set(target) == {"shards", "img_scale", "with_labels", "class_sets"} and list(target.class_sets) == ["all"]


@pytest.mark.parametrize("name", UDA_FILES)
def test_uda_daformer_parts(name):
    cfg = _load(name)
    m = cfg.method
    assert m.name == "uda"
    assert m.teacher.alpha == pytest.approx(0.999)
    assert m.pseudo.threshold == pytest.approx(0.968)
    assert m.mix.enabled and m.mix.jitter_p == pytest.approx(0.8) and m.mix.jitter_strength == pytest.approx(0.2)
    assert m.mix.blur_p == pytest.approx(0.5) and list(m.mix.blur_sigma) == [0.15, 1.15]
    assert m.fd.enabled and m.fd.weight == pytest.approx(0.005) and m.fd.min_ratio == pytest.approx(0.75)
    assert list(m.fd.classes) == DAFORMER_FD_CLASSES == [6, 7, 11, 12, 13, 14, 15, 16, 17, 18]
    assert not m.mic.enabled
    s, t = cfg.data.source, cfg.data.target
    assert s.sampling.mode == "rcs" and t.sampling.mode == "uniform"
    assert s.sampling.rcs_temperature == pytest.approx(0.01) and s.sampling.rcs_min_pixels == 3000
    assert not t.with_labels and t.cat_max_ratio == 1.0 and t.ratio_range is None
    assert t.flip_prob == pytest.approx(0.5)
    # ClassMix pairs source and target images (methods/uda.py checks this when built)
    assert s.batch_size == t.batch_size == 2 and list(s.crop_size) == list(t.crop_size)


@pytest.mark.parametrize("name", HRDA + ["source_only_cs_hrda.yaml"])
def test_hrda_model_and_crops(name):
    cfg = _load(name)
    h = cfg.model.hrda
    assert cfg.model.name == "hrda_mitb5" and h.enabled
    assert h.context_scale == pytest.approx(0.5) and list(h.detail_crop) == [512, 512]
    assert h.crop_divisible == 8 and h.hr_loss_weight == pytest.approx(0.1) and h.lr_loss_weight == 0.0
    assert h.attention_classwise and h.fixed_attention is None
    assert list(h.detail_stride) == [256, 256]  # hr_slide_overlapping: half the detail crop
    assert list(cfg.model.test_window) == [1024, 1024] and list(cfg.model.test_stride) == [512, 512]
    assert cfg.model.batched_slide
    assert list(cfg.data.source.crop_size) == [1024, 1024]
    if cfg.method.name == "uda":
        assert cfg.data.source.sampling.rcs_min_crop_ratio == pytest.approx(2.0)
        assert list(cfg.data.target.crop_size) == [1024, 1024]


@pytest.mark.parametrize("name,source,target,val,ignore", [
    ("hrda_cs2acdc_night.yaml", [2048, 1024], [1920, 1080], [1920, 1080], (0, 0)),
    ("hrda_cs2darkzurich.yaml", [2048, 1024], [1920, 1080], [1920, 1080], (0, 0)),
    ("hrda_gta2cs.yaml", [2560, 1440], [2048, 1024], [2048, 1024], (30, 240)),
    ("daformer_cs2acdc_night.yaml", [1024, 512], [960, 540], [960, 540], (15, 120)),
])
def test_per_benchmark_scales_and_pseudo_label_crop(name, source, target, val, ignore):
    cfg = _load(name)
    assert list(cfg.data.source.img_scale) == source
    assert list(cfg.data.target.img_scale) == target
    (target,) = cfg.data.val.values()
    assert list(target.img_scale) == val == list(cfg.data.test.img_scale)
    assert (cfg.method.pseudo.ignore_top, cfg.method.pseudo.ignore_bottom) == ignore


def test_daformer_is_half_resolution_whole_image():
    cfg = _load("daformer_cs2acdc_night.yaml")
    assert cfg.model.name == "daformer_mitb5" and not cfg.model.hrda.enabled
    assert cfg.model.test_window is None  # DAFormer: test_cfg mode='whole'
    assert list(cfg.data.source.crop_size) == [512, 512]
    assert cfg.data.source.sampling.rcs_min_crop_ratio == pytest.approx(0.5)
    assert list(cfg.model.head.dilations) == [1, 6, 12, 18] and cfg.model.head.embed_dim == 256


def test_source_only_baseline():
    cfg = _load("source_only_cs_hrda.yaml")
    assert cfg.method.name == "source_only"
    assert cfg.data.source.sampling.mode == "uniform"  # DAFormer/HRDA set RCS only for dacs
    assert list(cfg.data.source.img_scale) == [2048, 1024]
    assert list(cfg.data.val.acdc_night.img_scale) == [1920, 1080]


def test_a_missing_weight_file_does_not_fail_the_load(tmp_path):
    missing = tmp_path / "no_such_mit_b5.pth"
    cfg = _load("hrda_gta2cs.yaml", f"model.pretrained={missing}")
    as_model_config(cfg.model)
    assert cfg.model.pretrained == str(missing) and not missing.exists()


def test_command_line_fills_shards_and_keeps_the_recipe():
    cfg = _load("hrda_cs2acdc_night.yaml", "data.source.shards=s/cs", "data.target.shards=s/acdc",
                "data.val.acdc_night.shards=s/acdc_val", "engine=zero2", "data.source.batch_size=1",
                "data.target.batch_size=1")
    assert (cfg.data.source.shards, cfg.data.target.shards, cfg.data.val.acdc_night.shards) == ("s/cs", "s/acdc", "s/acdc_val")
    assert cfg.engine.kind == "zero2" and cfg.engine.precision == "fp32"  # the group merges into the node
    assert cfg.data.source.batch_size == cfg.data.target.batch_size == 1
    assert cfg.data.source.sampling.mode == "rcs" and cfg.model.hrda.enabled


# ------------------------------------------------------------- PIG's values (docs/eglp.md)

EGLP = CONFIGS / "eglp"


@pytest.mark.parametrize("name,scale,crop,window,seed", [
    ("city2nightcity_pig.yaml", [1024, 512], [512, 512], [512, 512], 0),
    ("city2acdc_pig.yaml", [1920, 1080], [1024, 1024], [1024, 1024], 2),
    ("city2darkzurich_pig.yaml", [1920, 1080], [1024, 1024], [1024, 1024], 2),
])
def test_pig_configs_hold_pigs_settings(name, scale, crop, window, seed):
    cfg = load_config(EGLP / name)
    assert cfg.method.name == "pig" and cfg.model.encoder == "mit_b5" and cfg.model.hrda.enabled
    o = cfg.optim
    assert (o.name, o.lr, o.weight_decay, o.head_lr_mult) == ("adamw", 6e-5, 0.01, 1.0)  # no head x10
    assert (cfg.trainer.max_iters, cfg.trainer.eval_interval, cfg.run.seed) == (40000, 4000, seed)
    p = cfg.method.pseudo
    assert (p.ignore_top, p.ignore_bottom, p.ignore_left, p.ignore_right) == (30, 240, 30, 30)
    s = cfg.data.source.sampling
    assert (s.mode, s.rcs_temperature, s.rcs_min_pixels, s.rcs_min_crop_ratio) == ("rcs", 0.01, 3000, 2.0)
    assert cfg.data.prompt.sampling.mode == "random" and cfg.data.prompt.cat_max_ratio == 0.75
    for stream in (cfg.data.target, cfg.data.prompt):
        assert list(stream.img_scale) == scale and list(stream.crop_size) == crop
        assert stream.batch_size == 2
    assert list(cfg.model.test_window) == window and list(cfg.model.test_stride) == [w // 2 for w in window]
    f = cfg.method.fusion
    assert (f.similarity, f.top_k, list(f.protected)) == ("lpips", 4, [6, 7, 15, 16, 17, 18])
    assert cfg.method.nfnet.enabled and not cfg.method.nfnet.model  # NFNet = the student's model


@pytest.mark.parametrize("name,pig", [("city2nightcity.yaml", "city2nightcity_pig.yaml"),
                                      ("city2nightcityplus.yaml", "city2nightcity_pig.yaml"),
                                      ("city2acdc.yaml", "city2acdc_pig.yaml"),
                                      ("city2darkzurich.yaml", "city2darkzurich_pig.yaml")])
def test_eglp_configs_are_pigs_plus_eglps_parts(name, pig):
    from omegaconf import OmegaConf

    cfg, base = load_config(EGLP / name), load_config(EGLP / pig)
    assert cfg.method.name == "eglp" and not cfg.method.fusion.enabled  # DNIS ranks, not LPIPS
    e = cfg.method.eglp
    assert e.dnis.enabled and e.fis.enabled and e.dms.enabled and e.rcm.enabled
    assert e.rcm.patch <= min(cfg.data.target.crop_size)
    for node in ("optim", "schedule", "trainer", "data", "model"):  # PIG's settings, unchanged
        assert OmegaConf.to_container(cfg[node]) == OmegaConf.to_container(base[node]), node
    for key in ("pseudo", "mix", "fd", "nfnet", "teacher"):
        assert OmegaConf.to_container(cfg.method[key]) == OmegaConf.to_container(base.method[key]), key


def _declared(cfg):
    """(dotted key, metadata, value) of every field with a declared rule, nested."""
    from eglp_dist.config_fields import iter_fields

    return ((key, f.metadata, value) for key, f, value in iter_fields(cfg) if f.metadata)


def _outside(lo, hi, lo_open, hi_open, value):
    if hi is not None:
        return hi + 1 if not hi_open else hi
    return (lo - 1 if not lo_open else lo) if isinstance(value, int) or lo == 0 or lo_open else lo - 1


def test_every_declared_range_of_every_shipped_config_refuses_a_value_outside_it():
    """Walks every shipped run config's fields (each key once): a value outside the field's
    declared range is a ConfigError naming the key; a class list with an index outside the
    model's classes too (checked at build time, where the number of classes is known)."""
    from eglp_dist.config_fields import CLASS_LIST, RANGE, check_class_lists
    from eglp_dist.errors import ConfigError

    tried, lists = set(), set()
    for path in RUN_CONFIGS:
        cfg = load_config(path)
        for key, meta, value in _declared(cfg):
            if RANGE in meta and key not in tried:
                tried.add(key)
                bad = _outside(*meta[RANGE], value)
                with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
                    load_config(path, [f"{key}={bad}"])
            if CLASS_LIST in meta and key not in lists and key.startswith("method."):
                lists.add(key)
                broken = load_config(path, [f"{key}=[0,{cfg.model.num_classes}]"])
                with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ".*outside"):
                    check_class_lists(broken.method, broken.model.num_classes, "method.")
    assert len(tried) > 60 and {"method.eglp.dms.max_weight", "method.eglp.dnis.momentum",
                                "method.nfnet.ams_ratio", "method.eglp.fis.threshold"} <= tried
    assert lists == {"method.eglp.rcm.classes", "method.eglp.fis.protected", "method.fusion.protected",
                     "method.fd.classes"}
