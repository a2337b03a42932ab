"""Baseline fidelity defects found by an audit against DAFormer / MIC / PIG (one test each)."""
import numpy as np
import torch

from dist_harness import run_ranks
from eglp_dist.config import PACKAGE_CONFIG_ROOT, load_config
from eglp_dist.data.augment import Augmenter
from eglp_dist.data.sampling import Pick
from eglp_dist.methods.parts.pseudo_label import pseudo_labels


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


def test_pseudo_label_margins_cover_left_and_right_columns():
    """PIG's margins [top, bottom, left, right] = [30, 240, 30, 30]: columns too."""
    logits = torch.zeros(1, 19, 8, 10)
    logits[:, 0] = 10.0
    _, weight, conf = pseudo_labels(logits, 0.5, ignore_top=1, ignore_bottom=2, ignore_left=3, ignore_right=1)
    assert conf.item() == 1.0
    expected = torch.zeros(8, 10)
    expected[1:6, 3:9] = 1.0
    assert torch.equal(weight[0], expected)


def _mic_backward(env, weight):
    from eglp_dist.methods import build_method

    cfg = load_config(PACKAGE_CONFIG_ROOT / "demo" / "tiny_uda.yaml",
                      ["method.mic.enabled=true", f"method.mic.weight={weight}", "method.pseudo.threshold=0.01",
                       "data.source.crop_size=[64,64]",
                       "data.target.crop_size=[64,64]"])
    method = build_method(cfg, env, torch.device("cpu"))
    seen = []
    original = method.student.backward
    method.student.backward = lambda loss: (seen.append(loss.detach().clone()), original(loss))[1]
    forwards = []
    inner = method.train_forward

    def spy(engine, images, seg, w=None, prefix="src"):
        out = inner(engine, images, seg, w, prefix)
        forwards.append((prefix, {k: v.detach().clone() for k, v in out[1].items()}))
        return out

    method.train_forward = spy
    g = torch.Generator().manual_seed(0)
    batches = {"source": {"img": torch.randn(2, 3, 64, 64, generator=g), "seg": torch.randint(0, 19, (2, 64, 64), generator=g)},
               "target": {"img": torch.randn(2, 3, 64, 64, generator=g)}}
    method.step(batches, 0)
    (_, masked), = [f for f in forwards if f[0] == "masked"]
    return seen[-1], masked


def test_mic_weight_scales_only_the_masked_decode_loss():
    """MIC (masking_consistency_module.py) multiplies `decode.loss_seg` by mask_lambda: HRDA's
    fused term, not its detail term."""
    (loss, parts), = run_ranks(_mic_backward, 1, args=(3.0,))
    assert parts["loss_seg"] > 0 and parts["loss_seg_hr"] > 0  # (threshold 0.01: pseudo weights 1)
    torch.testing.assert_close(loss, 3.0 * parts["loss_seg"] + parts["loss_seg_hr"])


def _teacher_bn(env):
    from eglp_dist.methods.parts.ema import EMATeacher

    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    teacher = EMATeacher(student)
    g = torch.Generator().manual_seed(env.rank)  # each rank its own target batch
    with torch.no_grad():
        teacher.pseudo_label_mode()(torch.randn(2, 3, 8, 8, generator=g) * (env.rank + 1))
    before = teacher.module[1].running_var.clone()
    teacher.sync_buffers()
    return before, teacher.module[1].running_var.clone()


def test_ema_teacher_batch_norm_statistics_are_one_model_after_sync():
    """The teacher's BN runs in training mode (DAFormer), so its running statistics drift
    per rank; synced where the students' are, the checkpoint's teacher is every rank's."""
    (b0, a0), (b1, a1) = run_ranks(_teacher_bn, 2)
    assert not torch.equal(b0, b1)  # drifted apart
    assert torch.equal(a0, b0) and torch.equal(a1, b0)  # rank 0's everywhere


# ------------------------------------------------------------------ noise a new user sees

def _ddp_step_warnings(env):
    import warnings

    from eglp_dist.methods import build_method

    cfg = load_config(PACKAGE_CONFIG_ROOT / "demo" / "tiny_source_only.yaml", ["data.source.crop_size=[64,64]"])
    with warnings.catch_warnings(record=True) as caught:  # keeps the filters in force
        method = build_method(cfg, env, torch.device("cpu"))  # MiT-b0: depthwise convs under DDP
        g = torch.Generator().manual_seed(0)
        method.step({"source": {"img": torch.randn(2, 3, 64, 64, generator=g),
                                "seg": torch.randint(0, 19, (2, 64, 64), generator=g)}}, 0)
    return [str(w.message).splitlines()[0] for w in caught]


def test_ddp_does_not_warn_about_depthwise_grad_strides_but_would_about_real_ones():
    for messages in run_ranks(_ddp_step_warnings, 2):
        assert not [m for m in messages if "Grad strides" in m], messages
    import warnings

    from eglp_dist.runtime.ddp_engine import quiet_depthwise_stride_warning

    head = "Grad strides do not match bucket view strides. This may indicate ...\n"
    with warnings.catch_warnings(record=True) as caught:
        quiet_depthwise_stride_warning()  # what every DDP engine does
        warnings.warn(head + "grad.sizes() = [1024, 1, 3, 3], strides() = [9, 1, 3, 1]", UserWarning)
        warnings.warn(head + "grad.sizes() = [64, 32, 3, 3], strides() = [288, 1, 96, 32]", UserWarning)
    assert [str(w.message).splitlines()[1] for w in caught] == ["grad.sizes() = [64, 32, 3, 3], strides() = [288, 1, 96, 32]"]


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


# ------------------------------------------------------------------ lossless evaluation pixels

def test_evaluation_splits_are_packed_losslessly_and_training_splits_as_jpeg(tmp_path):
    from PIL import Image

    from eglp_dist.data.offline import synth
    from eglp_dist.data.offline.pack import pack
    from eglp_dist.data.shards import open_shards

    root = tmp_path / "cs"
    synth.write_dataset("cityscapes", root, n=3, splits=["train", "val"], size=(64, 32))
    for split, ext in (("val", "png"), ("train", "jpg")):
        m = pack("cityscapes", root, split, tmp_path / split, workers=1, progress=False)
        assert m["image_format"] == ext
        reader = open_shards(tmp_path / split)
        for i, s in enumerate(m["samples"]):
            comps = reader.read(i)
            assert ext in comps
            if split == "val":  # the dataset's own pixels, exactly
                import io

                got = np.asarray(Image.open(io.BytesIO(comps["png"])).convert("RGB"))
                assert np.array_equal(got, np.asarray(Image.open(root / s["source"]).convert("RGB")))
    # a JPEG source is stored as it is, whatever the format (no second lossy generation)
    mroot = tmp_path / "map"
    synth.write_dataset("mapillary", mroot, n=2, splits=["val"], size=(64, 32))
    m = pack("mapillary", mroot, "val", tmp_path / "mv", workers=1, progress=False)
    reader = open_shards(tmp_path / "mv")
    for i, s in enumerate(m["samples"]):
        assert reader.read(i)["jpg"] == (mroot / s["source"]).read_bytes()


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


# ------------------------------------------------------------------ house hygiene

def _eglp_imports():
    """eglp_dist module -> the eglp_dist modules it imports, at module level or inside functions."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "eglp_dist"
    mods = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(root.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {}
    for name, p in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("eglp_dist"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("eglp_dist")}
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def test_no_import_cycles_between_eglp_dist_modules():
    graph = _eglp_imports()
    cycles = []
    for start in graph:  # a path back to the start = a cycle through it
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(path)
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert not cycles, cycles[:3]
    # the back-ends share their planning pieces through their own module, not the facade
    assert "eglp_dist.data.loader" not in graph["eglp_dist.data.pil"] | graph["eglp_dist.data.dali"]
    assert "eglp_dist.config" not in graph["eglp_dist.models.config"]


def test_the_pil_backend_is_named_for_what_it_is_and_its_old_name_still_works():
    import warnings

    import pytest

    from eglp_dist.data.config import DataConfig, backend_of

    assert DataConfig().backend == "pil"
    with pytest.warns(FutureWarning, match="data.backend=pil"):
        assert backend_of(DataConfig(backend="wds")) == "pil"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend_of(DataConfig(backend="dali")) == "dali"


def test_the_layers_of_the_tree_import_only_downwards():
    """What the folders say: training's data code never reaches the offline tools (dataset
    folders -> shards), a recipe's part never imports a recipe, the runtime knows no method."""
    graph = _eglp_imports()
    recipes = {f"eglp_dist.methods.{m}" for m in ("base", "source_only", "uda", "pig", "eglp", "spn")}
    for module, deps in graph.items():
        if module.startswith("eglp_dist.data.") and not module.startswith("eglp_dist.data.offline"):
            assert not {d for d in deps if d.startswith("eglp_dist.data.offline")}, module
        if module.startswith("eglp_dist.methods.parts"):
            assert not deps & recipes, module
        if module.startswith("eglp_dist.runtime"):
            assert not {d for d in deps if d.startswith("eglp_dist.methods")}, module


def test_synthetic_scenes_content_rendering_and_files_live_apart():
    from eglp_dist.data import codecs
    from eglp_dist.data.offline import synth, synth_render, synth_scene

    graph = _eglp_imports()
    assert "eglp_dist.data.offline.synth_render" not in graph["eglp_dist.data.offline.synth_scene"]  # content knows no pixels
    assert "eglp_dist.data.offline.synth" not in graph["eglp_dist.data.offline.synth_render"]
    rgb = np.zeros((4, 5, 3), np.uint16)
    rgb[..., 0] = np.arange(20).reshape(4, 5) * 1000
    assert np.array_equal(codecs.decode_png16(codecs.encode_png16_rgb(rgb), "x.png"), rgb)  # lossless, 16 bits
    assert synth_render.STYLES == synth.STYLES and synth_scene.MIN_SIZE == synth.MIN_SIZE
