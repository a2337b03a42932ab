"""Synthetic scenes: deterministic, written in every real layout, night shift unequal by class."""
import numpy as np
import pytest

from eglp_dist.data import labels as L
from eglp_dist.data.offline import synth
from eglp_dist.data.codecs import load_label, load_rgb
from eglp_dist.data.offline.layouts import LAYOUTS, default_splits

SIZE = (128, 64)


def test_deterministic_by_seed_and_content_independent_of_style():
    a_img, a_lab = synth.sample(3, "train", 5, SIZE, "day")
    b_img, b_lab = synth.sample(3, "train", 5, SIZE, "day")
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    n_img, n_lab = synth.sample(3, "train", 5, SIZE, "night")
    assert np.array_equal(a_lab, n_lab) and not np.array_equal(a_img, n_img)  # a day/night pair
    c_img, c_lab = synth.sample(4, "train", 5, SIZE, "day")
    assert not np.array_equal(a_lab, c_lab)


def test_scenes_cover_the_classes_with_realistic_frequencies():
    counts = np.zeros(256, np.int64)
    for i in range(30):
        _, lab = synth.sample(0, "train", i, (256, 128), "day")
        counts += np.bincount(lab.ravel(), minlength=256)
    present = np.flatnonzero(counts[:19])
    assert len(present) >= 17, [L.CLASSES[c] for c in range(19) if c not in present]
    # stuff dominates, as in Cityscapes: road/building/sky >> traffic light/rider/train
    big = counts[[L.CLASS_INDEX[c] for c in ("road", "building", "sky")]].min()
    small = counts[[L.CLASS_INDEX[c] for c in ("traffic light", "rider")]].max()
    assert big > 20 * small
    assert counts[255] > 0  # the ego-vehicle hood is ignore


def test_night_changes_classes_unequally():
    """Sky and buildings change much more than the road; lit objects glow; noise is added."""
    change = {c: [] for c in ("road", "building", "sky", "vegetation")}
    glow = []
    for i in range(6):
        day, lab = synth.sample(1, "val", i, (256, 128), "day")
        night, _ = synth.sample(1, "val", i, (256, 128), "night")
        d, n = day.astype(np.float32), night.astype(np.float32)
        for c in change:
            m = lab == L.CLASS_INDEX[c]
            if m.sum() > 50:
                change[c].append(n[m].mean() / max(d[m].mean(), 1.0))
        tl = lab == L.CLASS_INDEX["traffic light"]
        if tl.any():
            glow.append(n[tl].max())
    ratio = {c: float(np.mean(v)) for c, v in change.items()}
    assert ratio["road"] > 0.45
    assert ratio["sky"] < 0.3 and ratio["building"] < ratio["road"] - 0.15
    assert ratio["vegetation"] < ratio["road"]
    assert glow and max(glow) > 200


def test_shift_scales_the_domain_gap():
    day, _ = synth.sample(2, "train", 1, SIZE, "day")
    gaps = [np.abs(synth.sample(2, "train", 1, SIZE, "night", shift)[0].astype(float) - day).mean()
            for shift in (0.0, 0.5, 1.0)]
    assert gaps[0] < 1.0 and gaps[0] < gaps[1] < gaps[2]


@pytest.mark.parametrize("style", synth.STYLES)
def test_every_style_renders(style):
    img, lab = synth.sample(0, "train", 0, SIZE, style)
    assert img.shape == (64, 128, 3) and img.dtype == np.uint8 and lab.shape == (64, 128)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_written_layout_is_found_by_the_same_layout(tmp_path, name):
    layout = LAYOUTS[name]
    written = synth.write_dataset(name, tmp_path, n=2, size=SIZE, seed=0)
    assert set(written) == set(default_splits(layout))
    for split, paths in written.items():
        pairs = layout.find(tmp_path, split)
        assert sorted(p.image for p in pairs) == sorted(paths)
        for p in pairs:
            img = load_rgb(p.image)
            assert img.size == SIZE
            if split in layout.labelled_splits:
                assert p.label is not None, p.missing_label
                train = load_label(p.label, p.encoding)  # decodes back to the drawn trainIds
                assert train.shape == (64, 128)
                assert set(np.unique(train).tolist()) <= set(range(19)) | {255}
            else:
                assert p.label is None


def test_labels_round_trip_through_every_encoding(tmp_path):
    """What synth draws is what pack reads back, whatever the dataset's label encoding."""
    _, lab = synth.sample(0, "train", 0, SIZE, "day")
    for enc in ("trainid", "cityscapes", "synthia", "mapillary"):
        path = tmp_path / f"{enc}.png"
        path.write_bytes(synth.encode_label(lab, enc))
        assert np.array_equal(load_label(path, enc), lab), enc


def test_cityscapes_writes_both_label_files(tmp_path):
    synth.write_dataset("cityscapes", tmp_path, n=1, splits=["val"], size=SIZE)
    names = sorted(p.name for p in (tmp_path / "gtFine" / "val").rglob("*.png"))
    assert names == ["aachen_000000_000019_gtFine_labelIds.png",
                     "aachen_000000_000019_gtFine_labelTrainIds.png"]
    assert (tmp_path / "leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png").is_file()


def test_prompt_images(tmp_path):
    synth.write_dataset("prompt", tmp_path / "prompt", n=3, size=SIZE)
    assert sorted(p.name for p in (tmp_path / "prompt" / "img").iterdir()) == \
        ["prompt_000.png", "prompt_001.png", "prompt_002.png"]
    assert len(list((tmp_path / "prompt" / "gt").iterdir())) == 3


def test_bad_arguments_raise_data_error(tmp_path):
    from eglp_dist.errors import DataError

    with pytest.raises(DataError, match="style"):
        synth.write_dataset("cityscapes", tmp_path, n=1, style="dusk", size=SIZE)
    with pytest.raises(DataError, match="unknown dataset"):
        synth.write_dataset("kitti", tmp_path, n=1, size=SIZE)
    with pytest.raises(DataError, match="split"):
        synth.write_dataset("cityscapes", tmp_path, n=1, splits=["extra"], size=SIZE)
