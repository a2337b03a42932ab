"""EGLP's own parts: DNIS (sums, one reduction, 1 rank == 2 ranks, ranks the synthetic night's
classes by their designed change, keeps unseen values), FIS, DMS (monotone), RCM (capacity,
weight-1 pasted labels, class thresholds), and exact resume of the method on 2 ranks."""

import numpy as np
import pytest
import torch

from dist_harness import run_ranks, train_with_method
from training_runs import assert_resume_exact, assert_same_tensors, night_folders
from eglp_dist.config import PACKAGE_CONFIG_ROOT, load_config
from eglp_dist.data.offline import synth
from eglp_dist.data.labels import CLASS_INDEX, CLASSES
from eglp_dist.methods.parts.dnis import DNIS
from eglp_dist.methods.parts.fusion import dms_weights, fis_classes, mix_probabilities, prompt_class_masks
from eglp_dist.methods.parts.rcm import ClassConfidence, RareClassMemory
from eglp_dist.runtime.parts import start_reduction

EGLP = PACKAGE_CONFIG_ROOT / "demo" / "tiny_eglp.yaml"
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def synthetic(style, seed, n, size=(256, 128)):
    imgs, segs = [], []
    for i in range(n):
        img, lab = synth.sample(seed, "train", i, size, style, 1.0)
        imgs.append(torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float())
        segs.append(torch.from_numpy(lab.astype(np.int64)))
    x = (torch.stack(imgs) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x, torch.stack(segs)


# --------------------------------------------------------------------------------- DNIS


def test_dnis_ranks_the_synthetic_nights_classes_by_their_designed_change():
    """synth.py darkens each class by a known factor (sky and building most, road least);
    DNIS, from day images and *other* night images, must order classes accordingly."""
    from scipy.stats import spearmanr

    day, night = synthetic("day", 0, 24), synthetic("night", 1, 24)
    d = DNIS(19, MEAN, STD, momentum=0.9)
    start_reduction([(d, d.local_sums(day[0], day[1], [night]))]).finish()
    value = d.value().numpy()
    seen = d.seen().numpy()
    change = synth.night_change()
    idx = np.flatnonzero(seen)
    assert len(idx) >= 15
    rho = spearmanr(1 - value[idx], change[idx]).statistic
    order = [CLASSES[c] for c in idx[np.argsort(value[idx])]]  # least similar first
    print(f"Spearman(1 - DNIS, designed change) = {rho:.2f}; least similar first: {order}")
    assert rho >= 0.5
    assert {"sky", "building"} <= set(order[:3]) and order[-1] == "road"


def _statistics_split(env, day, night):
    """DNIS and RCM's confidences fed as EGLP feeds them: both parts' local sums in one
    collective per step (runtime.parts), each rank its own half of the same samples."""
    d = DNIS(19, MEAN, STD, momentum=0.5)
    conf = ClassConfidence([13, 6], 19, momentum=0.5)
    lo, hi = env.rank * 2, env.rank * 2 + 2
    for step in range(2):
        sl = slice(lo + 4 * step, hi + 4 * step) if env.world_size == 2 else slice(4 * step, 4 * step + 4)
        prob = torch.softmax(night[0][sl].mean(1, keepdim=True).expand(-1, 19, -1, -1) * torch.arange(19.).view(1, -1, 1, 1), 1)
        pending = start_reduction([(d, d.local_sums(day[0][sl], day[1][sl], [(night[0][sl], night[1][sl])])),
                                   (conf, conf.local_sums(*prob.max(1)))])
        pending.finish()
    return d.sums.clone(), d.value(), conf.conf.clone()


def test_dnis_and_rcm_statistics_on_two_ranks_equal_one_rank_over_the_same_samples():
    day, night = synthetic("day", 3, 8, (128, 64)), synthetic("night", 4, 8, (128, 64))
    (one_sums, one_value, one_conf), = run_ranks(_statistics_split, 1, args=(day, night))
    two = run_ranks(_statistics_split, 2, args=(day, night))
    assert one_conf[1].sum() == 4 * 64 * 128 * (0.5 + 1)  # EMA (momentum 0.5) of 2 steps of 4 images: every pixel
    for sums, value, conf in two:
        torch.testing.assert_close(sums, one_sums, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(value, one_value, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(conf, one_conf, rtol=1e-12, atol=1e-9)
    assert torch.equal(two[0][0], two[1][0]) and torch.equal(two[0][2], two[1][2])  # identical on every rank


def test_a_class_absent_from_a_step_keeps_its_dnis_and_unseen_classes_are_marked():
    day, night = synthetic("day", 0, 4, (128, 64)), synthetic("night", 1, 4, (128, 64))
    d = DNIS(19, MEAN, STD, momentum=0.9)
    start_reduction([(d, d.local_sums(day[0], day[1], [night]))]).finish()
    before = d.value()
    sky = CLASS_INDEX["sky"]
    no_sky = [torch.where(s == sky, torch.full_like(s, 255), s) for s in (day[1], night[1])]
    start_reduction([(d, d.local_sums(day[0], no_sky[0], [(night[0], no_sky[1])]))]).finish()
    after = d.value()
    torch.testing.assert_close(after[sky], before[sky], rtol=1e-6, atol=0)
    never = (d.sums[..., 0] == 0).any(0)
    assert never.any() and (after[never] == 1).all() and not d.seen()[never].any()
    logs = d.logs()
    assert set(logs) == {f"dnis/{c}" for c in CLASSES} | {"dnis/seen_share"}


# ------------------------------------------------------------------------------ FIS / DMS


def test_fis_picks_exactly_the_low_dnis_classes_and_never_a_protected_one():
    dnis = torch.linspace(0, 1, 19)
    seen = torch.ones(19, dtype=torch.bool)
    seen[1] = False
    chosen = fis_classes(dnis, seen, "bottom_k", 4, 0.0, protected=[2])
    assert chosen.nonzero().flatten().tolist() == [0, 3, 4, 5]  # 1 unseen, 2 protected
    chosen = fis_classes(dnis, seen, "threshold", 0, 0.2, protected=[0])
    assert chosen.nonzero().flatten().tolist() == [2, 3]  # dnis < 0.2: 0..3; 0 protected, 1 unseen


def test_dms_weights_fall_monotonically_with_dnis():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        dnis = torch.rand(19, generator=g)
        seen = torch.rand(19, generator=g) > 0.2
        w = dms_weights(dnis, seen, gamma=float(torch.rand(1, generator=g)) * 2 + 0.1, max_weight=0.75,
                        protected=[6])
        free = seen.clone()
        free[6] = False  # protected: always 0
        ws = w[free][torch.argsort(dnis[free])]
        assert (ws[1:] <= ws[:-1] + 1e-7).all()  # non-increasing in DNIS
        assert w.max() <= 0.75 + 1e-7 and w.min() >= 0 and w[6] == 0 and (w[~seen] == 0).all()
    mixed = mix_probabilities(torch.softmax(torch.randn(1, 19, 4, 4), 1), torch.softmax(torch.randn(1, 19, 4, 4), 1),
                              torch.rand(19))
    torch.testing.assert_close(mixed.sum(1), torch.ones(1, 4, 4))


def test_dms_monotone_including_protected_free_case():
    dnis = torch.tensor([0.9, 0.1, 0.5, 0.3])
    w = dms_weights(dnis, torch.ones(4, dtype=torch.bool), 1.0, 1.0, protected=[])
    assert w.tolist() == pytest.approx([0.0, 1.0, 0.5, 0.75])
    rate = prompt_class_masks(torch.tensor([[[0, 1, 2, 255]]]).expand(200, 1, 4).contiguous(), w, 1.0,
                              torch.Generator().manual_seed(0)).float().mean((0, 1))
    assert rate[0] == 0 and rate[1] == 1 and rate[3] == 0 and 0.3 < rate[2] < 0.7  # P = rate * w_c


# ------------------------------------------------------------------------------------- RCM


def test_rcm_never_exceeds_capacity_and_pasted_pixels_carry_their_class_with_weight_1():
    g = torch.Generator().manual_seed(0)
    bank = RareClassMemory([13, 6], capacity=3, patch=8, min_pixels=4, num_classes=19)
    for step in range(6):
        seg = torch.zeros(2, 32, 32, dtype=torch.long)
        seg[:, 4:12, 4:12] = 13
        seg[1, 20:24, 20:26] = 6
        bank.add(torch.randn(2, 3, 32, 32, generator=g), seg, night=step % 2 == 1, generator=g)
        assert (bank.filled <= 3).all()
    assert bank.filled.tolist() == [3, 3] and bank.masks.shape[1] == 3
    imgs, segs = torch.randn(2, 3, 32, 32, generator=g), torch.full((2, 32, 32), 5, dtype=torch.long)
    weights = torch.full((2, 32, 32), 0.3)
    out_img, out_seg, out_w, pasted = bank.paste(imgs, segs, weights, 2, g)
    assert pasted.any()
    assert set(out_seg[pasted].unique().tolist()) <= {13, 6} and (out_w[pasted] == 1).all()
    assert (out_seg[~pasted] == 5).all() and (out_w[~pasted] == 0.3).all()
    assert torch.equal(out_img[~pasted.unsqueeze(1).expand_as(imgs)], imgs[~pasted.unsqueeze(1).expand_as(imgs)])


def _window_positions(images, segs, patch, image, mask, c):
    """Every (image, y, x) of the padded batch whose patch x patch window is ``image`` with
    ``mask`` = its class-``c`` pixels (y, x: the window's centre in the unpadded image)."""
    half = patch // 2
    pad = (half, patch - half, half, patch - half)
    win_img = torch.nn.functional.pad(images, pad).unfold(2, patch, 1).unfold(3, patch, 1)  # B,3,H,W,p,p
    win_seg = torch.nn.functional.pad(segs, pad, value=255).unfold(1, patch, 1).unfold(2, patch, 1)
    same = (win_img == image[None, :, None, None]).all(-1).all(-1).all(1) & \
        ((win_seg == c) == mask).all(-1).all(-1)
    return {tuple(int(v) for v in pos) for pos in same.nonzero()}


def test_rcm_stores_the_images_own_windows_around_random_pixels_of_the_class():
    """Each stored window is an image's own pixels around one pixel of the class, its mask
    that class's pixels there; the loader's host counts and the device-counted fallback store
    the same (no host sync needed); over many draws the centre is many different pixels."""
    from eglp_dist.methods.parts.rcm import label_counts

    g = torch.Generator().manual_seed(3)
    segs = torch.randint(0, 19, (3, 40, 56), generator=g)
    segs[:, 10:20, 5:30] = 13  # enough of a rare class to store
    segs[1, :8] = 255
    images = torch.randn(3, 3, 40, 56, generator=g)
    banks = [RareClassMemory([13, 6, 17], capacity=64, patch=8, min_pixels=20, num_classes=19) for _ in range(2)]
    gens = [torch.Generator().manual_seed(9) for _ in range(2)]
    for step in range(12):
        banks[0].add(images, segs, step % 2 == 1, gens[0])  # counts on the device (fallback)
        banks[1].add(images, segs, step % 2 == 1, gens[1], counts=label_counts(segs))  # from the loader
    for k, v in banks[0].state_dict().items():
        assert torch.equal(banks[1].state_dict()[k], v), k
    bank = banks[0]
    assert bank.filled[0] == 36 and bank.night[0, :6].tolist() == [False] * 3 + [True] * 3  # 3 images a step
    centres = set()
    for e in range(int(bank.filled[0])):
        image, mask = bank.images[0, e], bank.masks[0, e]
        assert mask[4, 4]  # the centre pixel is one of the class's
        found = _window_positions(images, segs, 8, image, mask, 13)
        assert found and all(segs[i, y, x] == 13 for i, y, x in found)
        centres |= found
    assert len(centres) > 20  # a random pixel each time, not the first one


def test_rcm_lowers_the_threshold_of_rare_classes_only():
    bank = ClassConfidence([13], num_classes=19, momentum=0.0)
    label = torch.tensor([[13, 13, 0, 0]])
    prob = torch.tensor([[0.6, 0.8, 0.5, 0.5]])
    start_reduction([(bank, bank.local_sums(prob, label))]).finish()
    thr = bank.thresholds(0.968)
    assert thr[13] == pytest.approx(0.7) and thr[0] == pytest.approx(0.968) and thr[1] == pytest.approx(0.968)


# -------------------------------------------------------------------------- the method


def _eglp_step(env):
    from eglp_dist.methods import build_method

    cfg = load_config(EGLP, ["data.source.crop_size=[64,64]", "data.target.crop_size=[64,64]",
                             "data.prompt.crop_size=[64,64]", "schedule.warmup_iters=0"])
    method = build_method(cfg, env, torch.device("cpu"))
    g = torch.Generator().manual_seed(env.rank)
    keys = []
    for it in range(3):
        seg = torch.randint(0, 19, (2, 64, 64), generator=g)
        seg[:, 8:24, 8:24] = 13  # a rare class for the memory
        b = {"source": {"img": torch.randn(2, 3, 64, 64, generator=g), "seg": seg},
             "target": {"img": torch.randn(2, 3, 64, 64, generator=g)},
             "prompt": {"img": torch.randn(2, 3, 64, 64, generator=g), "seg": seg.flip(-1)}}
        logs = method.step(b, it)
        assert all(torch.isfinite(v) for v in logs.values())
        keys.append(sorted(logs))
    assert keys[0] == keys[1] == keys[2]
    return keys[-1], float(method.rcm.filled.max()), method.dnis.sums.clone()


def test_eglp_logs_the_same_keys_on_every_rank_and_shares_dnis():
    results = run_ranks(_eglp_step, 2)
    keys = results[0][0]
    assert keys == results[1][0]
    assert {f"dnis/{c}" for c in CLASSES} <= set(keys)
    assert {"rcm.pasted_pixels", "dms.mean_weight", "fusion.replaced", "night.mix.loss_seg"} <= set(keys)
    assert results[0][1] > 0  # the memory holds patches
    assert torch.equal(results[0][2], results[1][2])  # DNIS reduced: identical on both ranks


@pytest.mark.parametrize("engine", ["ddp", pytest.param("zero2", marks=pytest.mark.slow)])
def test_eglp_resume_is_exact_on_two_ranks(demo_shards, tmp_path, engine):
    """PIG's state plus DNIS's run-wide sums and each rank's RCM bank."""
    _, a, b = assert_resume_exact(EGLP, "demo_eglp", tmp_path, night_folders(demo_shards, prompt=True),
                                  f"engine={engine}", "schedule.warmup_iters=2", engines=("student", "nfnet"),
                                  modules=("teacher", "nfnet_teacher", "dnis"))
    assert (a.modules["dnis"]["sums"][..., 0] > 0).any()  # DNIS has statistics to restore
    for ra, rb in zip(a.ranks, b.ranks):
        assert_same_tensors(ra["method"]["rcm"], rb["method"]["rcm"], "rcm")
        assert ra["method"]["rcm"]["filled"].sum() > 0  # the bank is in the checkpoint


# -------------------------------------------- defects found by reading the code (issue: evidence)


def _eglp_method(overrides=()):
    from eglp_dist.runtime.env import DistEnv
    from eglp_dist.methods import build_method

    cfg = load_config(EGLP, ["data.source.crop_size=[64,64]", "data.target.crop_size=[64,64]",
                             "data.prompt.crop_size=[64,64]", "schedule.warmup_iters=0", *overrides])
    return build_method(cfg, DistEnv(), torch.device("cpu"))


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(0, 19, (2, 64, 64), generator=g)
    return {"source": {"img": torch.randn(2, 3, 64, 64, generator=g), "seg": seg},
            "target": {"img": torch.randn(2, 3, 64, 64, generator=g)},
            "prompt": {"img": torch.randn(2, 3, 64, 64, generator=g), "seg": seg.flip(-1)}}


def _teachers(method, uda_logits, night_logits):
    """Replace both teachers' pseudo-label forwards by fixed logits."""
    def logits(teacher, engine, images):
        return uda_logits if teacher is method.teacher else night_logits
    method.teacher_logits = logits


def _pseudo_state(method, batches):
    s = method.state_type(it=1, batches=batches)
    method.pseudo_label_step(s)
    return s


def test_rare_thresholds_raise_the_weight_of_rare_pixels_only():
    """A near-uniform teacher: DAFormer's share is 0 for every image; RCM's lowered threshold of
    class 13 (car) gives weight 1 to car pixels it reaches, and nothing else (before: the
    lowered threshold fed the per-image share and lifted every pixel of the image)."""
    m = _eglp_method(["method.eglp.dnis.enabled=false", "method.eglp.dms.enabled=false",
                      "method.eglp.fis.enabled=false", "method.nfnet.enabled=false"])
    logits = torch.zeros(2, 19, 64, 64)
    logits[:, 13, :, :32] = 1.0  # car on the left half, prob ~0.13; right half uniform (road by argmax)
    _teachers(m, logits, None)
    m.rcm_conf.conf[0, 13], m.rcm_conf.conf[1, 13] = 0.1 * 1000, 1000  # the teacher's mean confidence on car: 0.1
    s = _pseudo_state(m, _batches())
    assert s.logs["pseudo.confidence"] == 0  # no pixel reaches 0.968: DAFormer's share stays 0
    assert (s.pweight[:, :, :32] == 1).all() and (s.pweight[:, :, 32:] == 0).all()
    assert s.logs["rcm.boosted_pixels"] == pytest.approx(0.5)


def test_fis_runs_after_dms_so_low_dnis_classes_take_nfnets_label():
    """UDA sure of road, NFNet sure of sky, sky the lowest DNIS: DMS's capped mix alone keeps
    road (max_weight 0.3); FIS then gives sky NFNet's label (before: FIS never ran with DMS on)."""
    m = _eglp_method(["method.eglp.dms.max_weight=0.3", "method.eglp.rcm.enabled=false", "method.eglp.fis.k=1"])
    sky, road = CLASS_INDEX["sky"], CLASS_INDEX["road"]
    uda, night = torch.zeros(2, 19, 64, 64), torch.zeros(2, 19, 64, 64)
    uda[:, road], night[:, sky] = 10.0, 10.0
    _teachers(m, uda, night)
    dnis = torch.ones(19)
    dnis[sky] = 0.1
    m.dnis.value = lambda: dnis
    m.dnis.seen = lambda: torch.ones(19, dtype=torch.bool)
    s = _pseudo_state(m, _batches())
    assert (s.plabel == sky).all()
    off = _eglp_method(["method.eglp.dms.max_weight=0.3", "method.eglp.rcm.enabled=false", "method.eglp.fis.enabled=false"])
    _teachers(off, uda, night)
    off.dnis.value, off.dnis.seen = m.dnis.value, m.dnis.seen
    assert (_pseudo_state(off, _batches()).plabel == road).all()  # DMS alone: UDA's road


def test_nfnets_dark_mix_gets_night_patches_only_unless_asked():
    day_only = RareClassMemory([13], capacity=2, patch=8, min_pixels=4, num_classes=19)
    seg = torch.zeros(1, 32, 32, dtype=torch.long)
    seg[:, 4:12, 4:12] = 13
    g = torch.Generator().manual_seed(0)
    day_only.add(torch.randn(1, 3, 32, 32), seg, night=False, generator=g)
    img, lab = torch.randn(1, 3, 32, 32), torch.zeros(1, 32, 32, dtype=torch.long)
    assert not day_only.paste(img, lab, None, 2, g, night_only=True)[3].any()
    assert day_only.paste(img, lab, None, 2, g)[3].any()
    for allow, changed in ((False, False), (True, True)):
        m = _eglp_method([f"method.eglp.rcm.day_patches_to_nfnet={allow}"])
        m.rcm = day_only
        out_img, out_seg = m.decorate_dark_mix(m.state_type(it=0, batches={}), img, lab)
        assert (not torch.equal(out_seg, lab)) is changed
    day_only.add(torch.randn(1, 3, 32, 32), seg, night=True, generator=g)
    _, out, _, pasted = day_only.paste(img, lab, None, 4, g, night_only=True)
    assert pasted.any()


def test_eglp_part_rules_name_their_keys():
    from eglp_dist.errors import ConfigError

    with pytest.raises(ConfigError, match=r"method.eglp.dnis.enabled=false.*method.eglp.dms.enabled=true"):
        _eglp_method(["method.eglp.dnis.enabled=false", "method.eglp.fis.enabled=false"])
    with pytest.raises(ConfigError, match=r"method.eglp.fis.enabled=true.*method.nfnet.enabled=false"):
        _eglp_method(["method.nfnet.enabled=false"])
    with pytest.raises(ConfigError, match="method.eglp.dms.prompt_rate.*data.prompt and data.target"):
        _eglp_method(["method.nfnet.dark_mix=false", "data.prompt.batch_size=1"])
    bank = RareClassMemory([13], capacity=2, patch=8, min_pixels=4, num_classes=19)
    other = RareClassMemory([13], capacity=3, patch=8, min_pixels=4, num_classes=19)
    with pytest.raises(ConfigError, match=r"method.eglp.rcm.*images saved \(1, 3, 3, 8, 8\) vs configured \(1, 2, 3, 8, 8\)"):
        bank.load_state_dict(other.state_dict())


def _thresholds_after_resume(env, overrides):
    m, _ = train_with_method(EGLP, overrides)
    return m.rcm_conf.thresholds(0.968), m.rcm_conf.conf.clone()


@pytest.mark.slow  # 2 + 3 ranks on 2 cores (~40 s): `make test-all` (CI)
@pytest.mark.parametrize("world", [3])
def test_rcm_thresholds_are_run_wide_state_equal_on_every_rank_after_a_world_size_change(tiny_shards, tmp_path, world):
    """Before: RCM's reduced confidences were per-rank state, so a rank added on resume started
    from zeros and its thresholds (and pseudo-label weights) differed from the others'."""
    def args(iters):
        return [f"run.out_dir={tmp_path}", f"data.source.shards={tiny_shards['cityscapes_train']}",
                f"data.target.shards={tiny_shards['acdc_night_train']}", f"data.prompt.shards={tiny_shards['prompt_night']}",
                "data.source.crop_size=[64,64]", "data.target.crop_size=[64,64]", "data.prompt.crop_size=[64,64]",
                "method.eglp.rcm.patch=16", f"trainer.max_iters={iters}", "trainer.ckpt_interval=2",
                "trainer.eval_interval=0", "trainer.image_interval=1000", "schedule.warmup_iters=0",
                "method.diagnostics.pseudo_label_iou=false"]

    run_ranks(_thresholds_after_resume, 2, args=(args(2),))
    saved = torch.load(tmp_path / "demo_eglp" / "checkpoints" / "iter_0000002" / "modules.pt", weights_only=False)
    assert (saved["rcm_confidence"]["conf"][1] > 0).any()  # saved once, as run-wide state
    out = run_ranks(_thresholds_after_resume, world, args=(args(3),))
    for thr, conf in out[1:]:
        assert torch.equal(thr, out[0][0]) and torch.equal(conf, out[0][1])
