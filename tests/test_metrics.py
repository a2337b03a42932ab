"""Confusion matrix, IoU and `eglp score` against an independent computation."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dist_harness import run_ranks
from eglp_dist.data.labels import CITYSCAPES_LABEL_IDS, NUM_CLASSES
from eglp_dist.metrics import ConfusionMeter, confusion_matrix, metrics_from_confusion


def _iou_by_sets(preds, gts):
    """Per-class IoU by counting pixel sets directly, no confusion matrix."""
    ious = []
    for c in range(NUM_CLASSES):
        inter = union = 0
        for p, g in zip(preds, gts):
            valid = g != 255
            inter += int(((p == c) & (g == c) & valid).sum())
            union += int((((p == c) | (g == c)) & valid).sum())
        ious.append(inter / union if union else np.nan)
    return np.array(ious)


def _random_pair(rng, shape=(24, 40)):
    gt = rng.integers(0, 12, shape)  # classes 12..18 absent from the labels
    gt[rng.random(shape) < 0.1] = 255
    pred = np.where(rng.random(shape) < 0.6, gt, rng.integers(0, 15, shape))
    pred[pred == 255] = 0
    return pred, gt


def test_iou_matches_set_counting_and_absent_classes_are_excluded():
    rng = np.random.default_rng(0)
    pairs = [_random_pair(rng) for _ in range(4)]
    m = sum(confusion_matrix(torch.from_numpy(p), torch.from_numpy(g)) for p, g in pairs)
    metrics = metrics_from_confusion(m)
    expected = _iou_by_sets(*zip(*pairs))
    np.testing.assert_allclose(metrics.iou, expected)
    assert np.isnan(metrics.iou[15:]).all()  # in neither labels nor predictions
    assert metrics.iou[12] == 0.0  # predicted but never labelled: counts as 0
    assert metrics.miou == pytest.approx(np.nanmean(expected))


def _meter_over_share(env, pairs):
    meter = ConfusionMeter()
    for p, g in pairs[env.rank::env.world_size]:
        meter.update(torch.from_numpy(p), torch.from_numpy(g))
    return meter.reduce()


def test_two_ranks_give_the_single_rank_matrix():
    rng = np.random.default_rng(1)
    pairs = [_random_pair(rng) for _ in range(5)]
    single = _meter_over_share(type("E", (), {"rank": 0, "world_size": 1})(), pairs)
    both = run_ranks(_meter_over_share, 2, args=(pairs,))
    assert torch.equal(both[0], single) and torch.equal(both[1], single)


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def test_score_cli_matches_independent_computation_and_reports_problems(tmp_path):
    rng = np.random.default_rng(2)
    lut = np.array(CITYSCAPES_LABEL_IDS + (0,) * (256 - NUM_CLASSES))
    lut[255] = 0
    preds, gts = [], []
    for i in range(3):
        pred, gt = _random_pair(rng)
        preds.append(pred)
        gts.append(gt)
        gt_label_ids = np.where(gt == 255, 0, lut[gt])  # labelIds on disk: 0 = unlabeled
        _write(tmp_path / "gt" / "city" / f"c_{i:06d}_gtFine_labelIds.png", gt_label_ids)
        _write(tmp_path / "pred" / f"c_{i:06d}_leftImg8bit.png", lut[pred])  # labelId predictions
    _write(tmp_path / "gt" / "city" / "c_000009_gtFine_labelIds.png", np.zeros((24, 40)))  # no prediction
    _write(tmp_path / "gt" / "city" / "c_000010_gtFine_labelIds.png", np.zeros((24, 40)))
    _write(tmp_path / "pred" / "c_000010_leftImg8bit.png", np.zeros((20, 40)))  # wrong size
    args = [sys.executable, "-m", "eglp_dist", "score", "--pred", str(tmp_path / "pred"),
            "--gt", str(tmp_path / "gt"), "--json", str(tmp_path / "s.json")]
    refused = subprocess.run(args, capture_output=True, text=True)
    assert refused.returncode == 2 and "only 3 of 5 label images" in refused.stderr
    out = subprocess.run(args + ["--allow-missing"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "missing prediction: 1" in out.stderr and "c_000009" in out.stderr
    assert "size mismatch: 1" in out.stderr
    result = json.loads((tmp_path / "s.json").read_text())
    expected = _iou_by_sets(preds, gts)
    assert result["mIoU"] == pytest.approx(np.nanmean(expected))
    assert "mIoU" in out.stdout
