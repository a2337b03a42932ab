"""`eglp score`: the confusion matrix of prediction PNGs against label PNGs equals a direct
numpy count, for trainId and labelId files on either side; problems are listed, not fatal."""
import json

import numpy as np
import pytest
from PIL import Image

from eglp_dist.cli import main as cli_main
from eglp_dist.data.labels import TRAIN_TO_CITYSCAPES_ID
from eglp_dist.score import sample_key, score_folders

HW = (24, 40)
VOID_LABEL_IDS = np.array([0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30])  # -> ignore


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr).astype(np.uint8)).save(path)


def _random_case(rng, n=4):
    """(predictions, labels) as trainIds; labels 255 where ignored."""
    preds, gts = [], []
    for _ in range(n):
        gt = rng.integers(0, 19, HW)
        gt[rng.random(HW) < 0.15] = 255
        pred = np.where(rng.random(HW) < 0.5, np.where(gt == 255, 0, gt), rng.integers(0, 19, HW))
        preds.append(pred)
        gts.append(gt)
    return preds, gts


def _numpy_confusion(preds, gts):
    """Independent count: rows = label, columns = prediction, ignore dropped."""
    counts = np.zeros(19 * 19, dtype=np.int64)
    for p, g in zip(preds, gts):
        keep = g != 255
        counts += np.bincount(g[keep] * 19 + p[keep], minlength=19 * 19)
    return counts.reshape(19, 19)


def _numpy_miou(m):
    tp = np.diag(m).astype(float)
    union = m.sum(0) + m.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    return float(np.nanmean(iou))


def _write_case(root, preds, gts, pred_enc, gt_enc, rng):
    for i, (p, g) in enumerate(zip(preds, gts)):
        stem = f"city_{i:06d}_000019"
        if gt_enc == "trainid":
            _write(root / "gt" / "city" / f"{stem}_gtFine_labelTrainIds.png", g)
        else:  # labelIds on disk: ignored pixels get one of the void ids
            ids = TRAIN_TO_CITYSCAPES_ID[np.where(g == 255, 0, g)]
            ids = np.where(g == 255, rng.choice(VOID_LABEL_IDS, HW), ids)
            _write(root / "gt" / "city" / f"{stem}_gtFine_labelIds.png", ids)
        _write(root / "pred" / "city" / f"{stem}_leftImg8bit.png",
               p if pred_enc == "trainid" else TRAIN_TO_CITYSCAPES_ID[p])


@pytest.mark.parametrize("pred_enc,gt_enc", [("trainid", "trainid"), ("labelid", "labelid"),
                                             ("trainid", "labelid"), ("labelid", "trainid")])
def test_score_equals_a_direct_numpy_count(tmp_path, pred_enc, gt_enc, capsys):
    rng = np.random.default_rng(0)
    preds, gts = _random_case(rng)
    _write_case(tmp_path, preds, gts, pred_enc, gt_enc, rng)
    expected = _numpy_confusion(preds, gts)
    matrix, problems, _ = score_folders(tmp_path / "pred", tmp_path / "gt")
    assert np.array_equal(matrix, expected)
    assert not any(problems.values())
    assert cli_main(["score", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                     "--json", str(tmp_path / "s.json")]) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["mIoU"] == pytest.approx(_numpy_miou(expected))
    assert len(result["IoU"]) == 19 and result["missing_prediction"] == []
    assert "mIoU" in capsys.readouterr().out


def test_labelid_predictions_without_high_ids_are_read_like_their_folder(tmp_path):
    """A labelId prediction holding only road/sidewalk/building (ids 7, 8, 11 < 19) fits
    trainIds too; it is read as labelIds because its folder's other files are."""
    rng = np.random.default_rng(1)
    preds, gts = _random_case(rng, n=3)
    preds[1] = rng.choice([0, 1, 2], HW)  # -> labelIds 7, 8, 11 only
    _write_case(tmp_path, preds, gts, "labelid", "trainid", rng)
    matrix, _, _ = score_folders(tmp_path / "pred", tmp_path / "gt")
    assert np.array_equal(matrix, _numpy_confusion(preds, gts))
    # a folder of such files alone says nothing: read as trainIds (values 7, 8, 11 as trainIds)
    one = _numpy_confusion([TRAIN_TO_CITYSCAPES_ID[preds[1]].astype(np.int64)], [gts[1]])
    solo = tmp_path / "solo"
    _write(solo / "city_000001_000019_leftImg8bit.png", TRAIN_TO_CITYSCAPES_ID[preds[1]])
    matrix, problems, _ = score_folders(solo, tmp_path / "gt")
    assert np.array_equal(matrix, one) and len(problems["missing_prediction"]) == 2


def test_partial_scores_are_errors_unless_allowed_and_always_listed(tmp_path, capsys):
    rng = np.random.default_rng(2)
    preds, gts = _random_case(rng, n=3)
    _write_case(tmp_path, preds, gts, "trainid", "trainid", rng)
    gt, pred = tmp_path / "gt" / "city", tmp_path / "pred" / "city"
    _write(gt / "city_000007_000019_gtFine_labelTrainIds.png", np.zeros(HW))  # no prediction
    _write(gt / "city_000008_000019_gtFine_labelTrainIds.png", np.zeros(HW))
    _write(pred / "city_000008_000019_leftImg8bit.png", np.zeros((20, 40)))  # wrong size
    _write(gt / "city_000009_000019_gtFine_labelTrainIds.png", np.zeros(HW))
    _write(pred / "city_000009_000019_leftImg8bit.png", np.zeros(HW + (3,)))  # RGB, not ids
    _write(pred / "other_000001_000019_leftImg8bit.png", np.zeros(HW))  # no label
    # companions of real label folders are not samples
    _write(gt / "city_000000_000019_gtFine_color.png", np.zeros(HW + (3,)))
    Image.fromarray(np.zeros(HW, np.uint16)).save(gt / "city_000000_000019_gtFine_instanceIds.png")
    args = ["score", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--json",
            str(tmp_path / "s.json")]
    assert cli_main(args) == 2  # a partial score is not the split's score unless asked for
    captured = capsys.readouterr()
    assert "only 3 of 6 label images" in captured.err and "--allow-missing" in captured.err
    assert "mIoU" not in captured.out and not (tmp_path / "s.json").exists()
    rc = cli_main(args + ["--allow-missing"])
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 0
    assert "images scored: 3 of 6 label images" in captured.out and "PARTIAL" in captured.out
    assert "missing prediction: 1" in err and "city_000007_000019_gtFine_labelTrainIds.png" in err
    assert "size mismatch: 1" in err and "(40, 20)" in err and "(40, 24)" in err
    assert "unreadable: 1" in err and "expected a single-channel id image" in err
    assert "unmatched prediction: 1" in err and "other_000001_000019" in err
    assert "color" not in err and "instanceIds" not in err
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["mIoU"] == pytest.approx(_numpy_miou(_numpy_confusion(preds, gts)))
    assert len(result["missing_prediction"]) == len(result["size_mismatch"]) == len(result["unreadable"]) == 1
    assert not list(tmp_path.glob(".*tmp"))


def test_nothing_matched_is_a_one_line_error(tmp_path, capsys):
    _write(tmp_path / "pred" / "a_leftImg8bit.png", np.zeros(HW))
    _write(tmp_path / "gt" / "b_gtFine_labelIds.png", np.zeros(HW))
    assert cli_main(["score", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("eglp score: error: no prediction in") and "matched a label" in err[-1]
    assert cli_main(["score", "--pred", str(tmp_path / "nope"), "--gt", str(tmp_path / "gt")]) == 2
    assert "nope: not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("name,key", [
    ("aachen_000000_000019_leftImg8bit.png", "aachen_000000_000019"),
    ("aachen_000000_000019_gtFine_labelTrainIds.png", "aachen_000000_000019"),
    ("lindau_000001_000019_leftImg8bit_foggy_beta_0.02.png", "lindau_000001_000019"),
    ("GOPR0356_frame_000321_rgb_anon.png", "GOPR0356_frame_000321"),
    ("GOPR0356_frame_000321_gt_labelTrainIds.png", "GOPR0356_frame_000321"),
    ("7d06fefd-f7be05a6_train_id.png", "7d06fefd-f7be05a6"),
    ("Chicago_0001.png", "Chicago_0001"),
])
def test_sample_keys(name, key):
    from pathlib import Path

    assert sample_key(Path(name)) == key


def test_a_key_shared_by_two_label_files_is_an_error(tmp_path, capsys):
    """ACDC's train/ and val/ repeat file names: --gt above both must not score whichever
    label sorts first (it silently gave 1.50 mIoU instead of 2.34)."""
    _write(tmp_path / "gt" / "train" / "GP010476_frame_000098_gt_labelTrainIds.png", np.zeros(HW))
    _write(tmp_path / "gt" / "val" / "GP010476_frame_000098_gt_labelTrainIds.png", np.ones(HW))
    _write(tmp_path / "pred" / "GP010476_frame_000098_rgb_anon.png", np.ones(HW))
    for extra in ([], ["--allow-missing"]):
        assert cli_main(["score", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), *extra]) == 2
        err = capsys.readouterr().err
        assert "ambiguous label: 1" in err and "name two or more files" in err
        assert str(tmp_path / "gt" / "train") in err and str(tmp_path / "gt" / "val") in err
    assert cli_main(["score", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt" / "val")]) == 0
    assert "images scored: 1 of 1 label images" in capsys.readouterr().out
