"""The pseudo-label IoU diagnostic: counts summed across ranks in the log interval's one
collective, ground truth pixel-aligned with the pseudo-label (a teacher replaced by the ground
truth scores 100), and never touching the training (a run with it trains bit for bit as one
without); the warm start's whole-model init."""
import json

import pytest
import torch

from dist_harness import run_ranks, train_with_method
from eglp_dist.config import PACKAGE_CONFIG_ROOT, load_config
from eglp_dist.data.labels import CLASSES
from eglp_dist.logging import Monitor
from eglp_dist.methods.parts.pseudo_iou import PseudoLabelIoU

UDA = PACKAGE_CONFIG_ROOT / "demo" / "tiny_uda.yaml"
EGLP = PACKAGE_CONFIG_ROOT / "demo" / "tiny_eglp.yaml"


def test_iou_from_counts_and_ignored_pixels():
    d = PseudoLabelIoU(["teacher", "final"], 3)
    gt = torch.tensor([[[0, 0, 1, 255]]])
    label = torch.tensor([[[0, 1, 1, 2]]])
    d.add("teacher", label, gt, torch.tensor([[[1.0, 0.5, 0.5, 1.0]]]))
    out = d.summarise(d.take())
    assert out["pseudo_iou/teacher/road"] == pytest.approx(0.5)  # 1 tp / (2 gt + 1 pred - 1)
    assert out["pseudo_iou/teacher/sidewalk"] == pytest.approx(0.5)
    assert out["pseudo_iou/teacher/mIoU"] == pytest.approx(0.5)  # class 2 only on an ignored pixel: not counted
    assert out["pseudo_iou_weighted/teacher/road"] == pytest.approx(1 / 1.5)
    assert out["pseudo_iou/final/mIoU"] != out["pseudo_iou/final/mIoU"]  # nothing counted: NaN
    assert d.take().sum() == 0  # take resets


def _flush_counts(env, tmp):
    mon = Monitor(tmp, env.is_main, start=0, max_iters=10, images_per_iter=4)
    d = PseudoLabelIoU(["teacher"], 19)
    gt = torch.zeros(1, 2, 2, dtype=torch.long)
    label = torch.full_like(gt, env.rank)  # rank 0 right everywhere, rank 1 wrong everywhere
    d.add("teacher", label, gt)
    mon.accumulate({"x": torch.tensor(1.0)})
    values = mon.flush(1, counters=[d])
    mon.close()
    return values


def test_counts_are_summed_across_ranks_in_the_flush(tmp_path):
    a, b = run_ranks(_flush_counts, 2, args=(str(tmp_path),))
    # summed: road 4 tp, 4 gt-road labelled sidewalk -> road IoU 4/8, sidewalk 0/4
    assert a["pseudo_iou/teacher/road"] == b["pseudo_iou/teacher/road"] == pytest.approx(0.5)
    assert a["pseudo_iou/teacher/sidewalk"] == 0.0
    assert a["pseudo_iou/teacher/mIoU"] == pytest.approx(0.25)
    lines = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert lines[0]["iter"] == 1 and lines[0]["pseudo_iou/teacher/road"] == pytest.approx(0.5)
    assert lines[0]["pseudo_iou/teacher/car"] is None  # never seen: null, not NaN


def _loader_batches(env, shards, ground_truth, with_labels):
    from eglp_dist.data.loader import build_train_stream

    cfg = load_config(UDA, [f"data.target.shards={shards['acdc_night_train']}", f"data.target.with_labels={with_labels}",
                            "data.target.cat_max_ratio=1.0"])
    stream = build_train_stream(cfg.data.target, cfg.data, 0, 1, seed=3, name="target", ground_truth=ground_truth)
    out = [next(stream) for _ in range(3)]
    stream.close()
    return out


def test_the_diagnostic_ground_truth_is_the_streams_label_under_the_same_crop_and_flip(tiny_shards):
    """With cat_max_ratio=1 a labelled stream's crops do not depend on its labels, so its `seg`
    must equal the `gt` an unlabelled stream reads for the diagnostic, and the images of the
    unlabelled stream must not change when it reads them."""
    plain = _loader_batches(None, tiny_shards, False, False)
    diag = _loader_batches(None, tiny_shards, True, False)
    labelled = _loader_batches(None, tiny_shards, False, True)
    for p, d, lab in zip(plain, diag, labelled):
        assert "gt" not in p and "seg" not in d and "label_counts" not in d  # never as a training label
        assert torch.equal(p["img"], d["img"]) and torch.equal(d["img"], lab["img"])
        assert torch.equal(d["gt"], lab["seg"])
        assert (d["gt"] != 255).any() and any(m["flip"] for b in diag for m in b["meta"])


def _oracle_run(env, overrides):
    """UDA whose teacher predicts the target's ground truth (one-hot logits of batch['gt'])."""
    import torch.nn.functional as F

    from eglp_dist.methods.uda import UDA as Recipe

    step, logits = Recipe.step, Recipe.teacher_logits

    def keep(self, batches, it):
        self._oracle = batches["target"]["gt"]
        return step(self, batches, it)

    def oracle(self, teacher, engine, images):
        return 10.0 * F.one_hot(self._oracle.clamp(max=18), 19).permute(0, 3, 1, 2).float()

    Recipe.step, Recipe.teacher_logits = keep, oracle
    try:
        train_with_method(UDA, overrides)
    finally:
        Recipe.step, Recipe.teacher_logits = step, logits


def _uda_args(shards, out, *extra):
    return [f"run.out_dir={out}", f"data.source.shards={shards['cityscapes_train']}",
            f"data.target.shards={shards['acdc_night_train']}", "data.source.crop_size=[64,64]",
            "data.target.crop_size=[64,64]", "trainer.max_iters=3", "trainer.log_interval=1",
            "trainer.image_interval=1000", "trainer.eval_interval=0", "trainer.ckpt_interval=100",
            "schedule.warmup_iters=0", *extra]


def test_a_teacher_replaced_by_the_ground_truth_scores_100_on_two_ranks(tiny_shards, tmp_path):
    run_ranks(_oracle_run, 2, args=(_uda_args(tiny_shards, tmp_path),))
    lines = [json.loads(line) for line in (tmp_path / "demo_uda" / "train.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for r in lines:
        for src in ("teacher", "final"):
            assert r[f"pseudo_iou/{src}/mIoU"] == pytest.approx(1.0), (src, r["iter"])
            assert r[f"pseudo_iou_weighted/{src}/mIoU"] == pytest.approx(1.0)
        assert {f"pseudo_iou/teacher/{c}" for c in CLASSES} <= set(r)
        assert r["pseudo.confidence"] == pytest.approx(1.0)


def _weights(env, config, overrides):

    m, _ = train_with_method(config, overrides)
    return {n: {k: v.clone() for k, v in e.model.state_dict().items()} for n, e in m.engines.items()}, \
        m.pseudo_iou is not None


@pytest.mark.slow  # two 2-rank EGLP trainings (~40 s): `make test-all` (CI); the oracle test stays default
def test_eglp_with_the_diagnostic_trains_bit_for_bit_as_without(tiny_shards, tmp_path):
    def args(out, mode):
        return _uda_args(tiny_shards, out, f"data.prompt.shards={tiny_shards['prompt_night']}",
                         "data.prompt.crop_size=[64,64]", "method.eglp.rcm.patch=16",
                         f"method.diagnostics.pseudo_label_iou={mode}")

    on = run_ranks(_weights, 2, args=(EGLP, args(tmp_path / "on", "null")))
    off = run_ranks(_weights, 2, args=(EGLP, args(tmp_path / "off", "false")))
    assert on[0][1] and not off[0][1]  # auto: on, the target shards are labelled
    for (a, _), (b, _) in zip(on, off):
        for engine in a:
            for k in a[engine]:
                assert torch.equal(a[engine][k], b[engine][k]), (engine, k)
    tb_keys = json.loads((tmp_path / "on" / "demo_eglp" / "train.jsonl").read_text().splitlines()[-1])
    assert {f"pseudo_iou/{s}/mIoU" for s in ("teacher", "nfnet", "dms", "fused", "final")} <= set(tb_keys)
    assert not any(k.startswith("pseudo_iou") for k in
                   json.loads((tmp_path / "off" / "demo_eglp" / "train.jsonl").read_text().splitlines()[-1]))


def test_on_without_labels_is_an_error_naming_the_key(tiny_shards):
    from eglp_dist.errors import ConfigError
    from eglp_dist.methods.parts.pseudo_iou import build_pseudo_iou

    cfg = load_config(UDA, ["method.diagnostics.pseudo_label_iou=true"])
    with pytest.raises(ConfigError, match="method.diagnostics.pseudo_label_iou=true"):
        build_pseudo_iou(cfg, ["teacher"], "cpu")
    cfg = load_config(UDA, [f"data.target.shards={tiny_shards['acdc_night_train']}"])
    assert build_pseudo_iou(cfg, ["teacher"], "cpu") is not None


def test_init_from_loads_the_whole_model_and_names_a_mismatch(tmp_path):
    from eglp_dist.errors import DataError
    from eglp_dist.models import build_segmentor, load_model_config

    torch.manual_seed(0)
    trained = build_segmentor(load_model_config("tiny_hrda"))
    torch.save(trained.state_dict(), tmp_path / "whole.pt")
    torch.manual_seed(1)
    warm = build_segmentor(load_model_config("tiny_hrda", {"init_from": str(tmp_path / "whole.pt")}))
    for k, v in trained.state_dict().items():
        assert torch.equal(v, warm.state_dict()[k]), k
    with pytest.raises(DataError, match="model.init_from"):
        build_segmentor(load_model_config("tiny_daformer", {"init_from": str(tmp_path / "whole.pt")}))
