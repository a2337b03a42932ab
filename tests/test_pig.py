"""The night branch (PIG-style recipe): what NFNet is fed, the dark mix, PMS/AMS, fusion with
protected classes, the NFNet teacher's EMA, the prompt stream, exact resume on 2 ranks, and
the guard that every rank logs the same keys."""
from pathlib import Path

import pytest
import torch

from dist_harness import run_ranks
from training_runs import assert_resume_exact, night_folders
from eglp_dist.config import PACKAGE_CONFIG_ROOT, load_config
from eglp_dist.methods.parts.fusion import fuse_labels, top_k_classes
from eglp_dist.methods.parts.nfnet import dark_mix, uses_ams
from eglp_dist.errors import ConfigError

PIG = PACKAGE_CONFIG_ROOT / "demo" / "tiny_pig.yaml"
SMALL = ["data.source.crop_size=[64,64]", "data.target.crop_size=[64,64]", "data.prompt.crop_size=[64,64]",
         "schedule.warmup_iters=0"]


def _batches(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    b, (h, w) = cfg.data.source.batch_size, cfg.data.source.crop_size
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {"source": {"img": rand(b, 3, h, w), "seg": torch.randint(0, 19, (b, h, w), generator=g)},
            "target": {"img": rand(b, 3, h, w)},
            "prompt": {"img": rand(b, 3, h, w), "seg": torch.randint(0, 19, (b, h, w), generator=g)}}


# ------------------------------------------------------------------------- unit contracts


def test_dark_mix_takes_the_prompt_labels_on_the_pasted_half_and_fused_ones_elsewhere():
    g = torch.Generator().manual_seed(0)
    b, h, w = 8, 6, 10
    p_img, t_img = torch.randn(b, 3, h, w), torch.randn(b, 3, h, w)
    p_seg, t_lab = torch.randint(0, 19, (b, h, w)), torch.randint(0, 19, (b, h, w))
    img, seg, pasted = dark_mix(p_img, p_seg, t_img, t_lab, g)
    sides = set()
    for i in range(b):
        left = pasted[i, :, : w // 2].all() and not pasted[i, :, w // 2:].any()
        right = pasted[i, :, w // 2:].all() and not pasted[i, :, : w // 2].any()
        assert left or right
        sides.add("left" if left else "right")
    assert sides == {"left", "right"}  # the side is drawn per image
    assert torch.equal(seg[pasted], p_seg[pasted]) and torch.equal(seg[~pasted], t_lab[~pasted])
    m = pasted.unsqueeze(1).expand_as(img)
    assert torch.equal(img[m], p_img[m]) and torch.equal(img[~m], t_img[~m])


def test_pms_and_ams_alternate_by_iteration():
    assert [uses_ams(i) for i in range(6)] == [False, True, False, True, False, True]


def test_fusion_replaces_exactly_the_selected_classes_and_never_a_protected_one():
    scores = torch.zeros(1, 19)
    scores[0, [2, 5, 8, 10, 13]] = torch.tensor([0.9, 0.1, 0.8, 0.7, 0.6])  # top 4: 2, 8, 10, 13
    selected = top_k_classes(scores, 4)
    assert selected[0].nonzero().flatten().tolist() == [2, 8, 10, 13]
    assert top_k_classes(torch.tensor([[0.0, 0.3, 0.0]]), 2).tolist() == [[False, True, False]]  # absent: never
    uda = torch.tensor([[[0, 1, 6, 7, 2, 3]]])
    night = torch.tensor([[[2, 8, 13, 10, 5, 4]]])
    fused = fuse_labels(uda, night, selected, protected=[6, 7])
    # pixel 0,1: night selected -> night; 2,3: UDA protected (6, 7) -> UDA; 4: night 5 not
    # selected -> UDA; 5: night 4 not selected -> UDA
    assert fused.tolist() == [[[2, 8, 6, 7, 2, 3]]]
    assert fuse_labels(uda, night, selected, protected=[]).tolist() == [[[2, 8, 13, 10, 2, 3]]]


def test_stats_similarity_scores_classes_by_their_appearance_change():
    from eglp_dist.methods.parts.similarity import StatsSimilarity

    mean, std = [0.0] * 3, [255.0] * 3  # images in [0, 1]
    seg = torch.zeros(1, 8, 8, dtype=torch.long)
    seg[:, 4:] = 1  # class 0 top half, class 1 bottom half; class 2 absent
    src = torch.full((1, 3, 8, 8), 0.5)
    tgt = src.clone()
    tgt[:, :, :4] -= 0.05  # class 0 slightly darker at night
    tgt[:, :, 4:] -= 0.40  # class 1 much darker
    scores = StatsSimilarity(mean, std, 19)(src, seg, tgt, seg)
    assert scores[0, 1] > scores[0, 0] > 0 and scores[0, 2:].eq(0).all()


def test_lpips_similarity_needs_a_local_alexnet_file_and_works_with_one(tmp_path):
    import torchvision

    from eglp_dist.methods.parts.similarity import LpipsSimilarity

    with pytest.raises(ConfigError, match="method.fusion.lpips_alexnet"):
        LpipsSimilarity(None, 19, "cpu")
    with pytest.raises(Exception, match="AlexNet weight file not found"):
        LpipsSimilarity(str(tmp_path / "nope.pth"), 19, "cpu")
    torch.manual_seed(0)
    path = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), path)  # random weights: the test's own file
    sim = LpipsSimilarity(str(path), 19, "cpu")
    src, tgt = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    seg = torch.zeros(2, 64, 64, dtype=torch.long)
    seg[:, :, 32:] = 3
    a, b = sim(src, seg, tgt, seg), sim(src, seg, tgt, seg)
    assert torch.equal(a, b)  # eval mode: no dropout, the same scores twice
    assert (a[:, [0, 3]] > 0).all() and a[:, [1, 2] + list(range(4, 19))].eq(0).all()


# ------------------------------------------------------------------ the method on one rank


def _pig_step_contracts(env):
    from eglp_dist.methods.parts.ema import ema_alpha
    from eglp_dist.methods import build_method

    cfg = load_config(PIG, SMALL)
    method = build_method(cfg, env, torch.device("cpu"))
    fed = []
    original = method.train_forward

    def spy(engine, images, seg, weight=None, prefix="src"):
        fed.append((engine.name, prefix, images.detach().clone(), weight))
        return original(engine, images, seg, weight, prefix)

    method.train_forward = spy
    nf_student, nf_teacher = method.nfnet.model, method.nfnet_teacher.module
    zero_share = {}
    for it in range(3):
        batches = _batches(cfg, it)
        before_student = [p.detach().clone() for p in nf_student.parameters()]
        before_teacher = [p.detach().clone() for p in nf_teacher.parameters()]
        fed.clear()
        logs = method.step(batches, it)
        src = batches["source"]["img"]
        night = [(p, x, w) for n, p, x, w in fed if n == "nfnet"]
        assert [p for p, _, _ in night] == ["night.prompt", "night.mix"]
        for _, x, _ in night:  # NFNet never receives a source image (nor part of one)
            assert not torch.isclose(x, src).flatten(1).any(1).all()
        assert torch.equal(night[0][1], batches["prompt"]["img"])
        assert all(w is None for _, _, w in night)  # unweighted
        zero_share[it] = float((night[1][1] == 0).all(1).float().mean())
        if it > 0:  # the NFNet teacher follows the EMA schedule before labelling
            a = ema_alpha(it, cfg.method.teacher.alpha)
            for t, t0, s0 in zip(nf_teacher.parameters(), before_teacher, before_student):
                torch.testing.assert_close(t, a * t0 + (1 - a) * s0)
        assert {"night.prompt.loss_seg", "night.mix.loss_seg", "fusion.replaced", "mix.loss_seg"} <= set(logs)
    assert zero_share[0] < 0.05 and zero_share[2] < 0.05 and zero_share[1] > 0.5  # AMS on odd iterations
    return True


def test_pig_step_feeds_nfnet_night_images_only_and_follows_pig():
    assert run_ranks(_pig_step_contracts, 1) == [True]


def _config_error(env, overrides):
    from eglp_dist.methods import build_method

    try:
        build_method(load_config(PIG, overrides), env, torch.device("cpu"))
    except ConfigError as exc:
        return str(exc)
    return None


def test_pig_config_errors_name_the_key():
    msgs = run_ranks(_config_error, 1, args=(["data.prompt.batch_size=1"],))
    assert "data.prompt and data.target" in msgs[0]
    msgs = run_ranks(_config_error, 1, args=(["method.nfnet.enabled=false"],))
    assert "method.fusion.enabled" in msgs[0]
    msgs = run_ranks(_config_error, 1, args=(["+method.nfnet.optim.lrr=1"],))
    assert "unknown config key 'lrr' (in method.nfnet.optim)" in msgs[0]


def _nfnet_own_settings(env):
    from eglp_dist.methods import build_method

    cfg = load_config(PIG, SMALL + ["+method.nfnet.optim.lr=0.002", "+method.nfnet.model.drop_path_rate=0.0"])
    method = build_method(cfg, env, torch.device("cpu"))
    return method.engines["nfnet"].lrs()[0], method.engines["student"].lrs()[0], len(method.engines)


def test_nfnet_has_its_own_config_nodes_defaulting_to_the_students():
    (nf_lr, student_lr, n), = run_ranks(_nfnet_own_settings, 1)
    assert n == 2 and nf_lr != student_lr  # lr of the first group at step 0 (warm-up 0)


# ---------------------------------------------------------------- streams and 2-rank runs


def test_the_prompt_stream_resumes_exactly(demo_shards):
    from eglp_dist.data.loader import build_train_stream

    cfg = load_config(PIG, [f"data.prompt.shards={demo_shards['prompt_night']}"])
    take = lambda s, n: [next(s) for _ in range(n)]  # noqa: E731
    full = take(build_train_stream(cfg.data.prompt, cfg.data, 1, 2, seed=3, name="prompt"), 5)
    first = build_train_stream(cfg.data.prompt, cfg.data, 1, 2, seed=3, name="prompt")
    take(first, 2)
    resumed = build_train_stream(cfg.data.prompt, cfg.data, 1, 2, seed=3, name="prompt")
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(full[2:], take(resumed, 3)):
        assert torch.equal(a["img"], b["img"]) and torch.equal(a["seg"], b["seg"]) and a["meta"] == b["meta"]
    keys = [m["index"] for batch in full for m in batch["meta"]]
    assert len(set(keys)) > 1  # drawn at random from the 6 prompts


@pytest.mark.parametrize("engine", ["ddp", pytest.param("zero2", marks=pytest.mark.slow)])
def test_pig_resume_is_exact_on_two_ranks(demo_shards, tmp_path, engine):
    _, a, _ = assert_resume_exact(PIG, "demo_pig", tmp_path, night_folders(demo_shards, prompt=True),
                                  f"engine={engine}", "schedule.warmup_iters=2",
                                  engines=("student", "nfnet"), modules=("teacher", "nfnet_teacher"))
    assert all(r["streams"]["prompt"]["step"] == 4 for r in a.ranks)


def _uneven_keys(env):
    from eglp_dist.logging import Monitor

    monitor = Monitor(Path("/nonexistent"), False, 0, 10, 2)
    logs = {"loss": torch.tensor(1.0)}
    if env.rank == 1:
        logs["dnis/bus"] = torch.tensor(0.5)  # a class present on one rank only
    monitor.accumulate(logs)
    try:
        monitor.flush(1)
    except RuntimeError as exc:
        return str(exc)
    return None


def test_ranks_that_log_different_keys_stop_with_the_keys_named():
    messages = run_ranks(_uneven_keys, 2)
    assert messages[0] == messages[1] and messages[0] is not None
    assert "rank 0 lacks dnis/bus" in messages[0] and "log a zero, not nothing" in messages[0]


def test_prompt_images_that_are_evaluation_images_are_refused_and_a_transductive_target_is_said(tiny_shards, capsys):
    from eglp_dist.data.leaks import check_streams_disjoint
    from eglp_dist.errors import ConfigError

    val = tiny_shards["acdc_night_val"]
    ok = load_config(PIG, [f"data.prompt.shards={tiny_shards['prompt_night']}", f"data.val.acdc_night.shards={val}",
                           f"data.target.shards={tiny_shards['acdc_night_train']}"])
    check_streams_disjoint(ok, ("source", "target", "prompt"))
    assert "share" not in capsys.readouterr().err
    leak = load_config(PIG, [f"data.prompt.shards={val}", f"data.val.acdc_night.shards={val}"])
    with pytest.raises(ConfigError, match=r"data.prompt.shards .* and data.val.acdc_night.shards .* share 1 entry: folder"):
        check_streams_disjoint(leak, ("source", "target", "prompt"))
    check_streams_disjoint(leak, ("source", "target"))  # a recipe without prompts: nothing to leak
    same = load_config(PIG, [f"data.target.shards={val}", f"data.val.acdc_night.shards={val}"])
    check_streams_disjoint(same, ("source", "target"))
    assert "transductive" in capsys.readouterr().err
