"""eglp pack: shards readable by webdataset and DALI, .idx equal to wds2idx's, exact labels,
class statistics, and a clear error (naming the file, leaving nothing behind) per bad input."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from eglp_dist.cli import main as cli_main
from eglp_dist.data import shards as S
from eglp_dist.data.offline import synth
from eglp_dist.data.codecs import decode_seg, load_label
from eglp_dist.data.offline.layouts import LAYOUTS
from eglp_dist.data.offline.pack import pack
from eglp_dist.errors import DataError

SIZE = (64, 32)


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    synth.write_dataset("cityscapes", root, n=7, splits=["train", "val", "test"], size=SIZE, seed=3)
    return root


@pytest.fixture(scope="module")
def packed(city, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "train"
    return out, pack("cityscapes", city, "train", out, shard_size=3, workers=2, progress=False)


def _truth(root, dataset, split):
    """{source path: trainIds} read straight from the dataset folder."""
    return {p.rel: load_label(p.label, p.encoding) for p in LAYOUTS[dataset].find(root, split)}


def test_manifest_and_shard_files(packed):
    out, m = packed
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["num_samples"] == m["num_samples"] == 7 and on_disk["labelled"]
    assert [s["num_samples"] for s in m["shards"]] == [3, 3, 1]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json"] + [f"cityscapes-train-00000{i}.{e}" for i in range(3) for e in ("tar", "idx")])
    assert m["skipped"] == [] and len(m["class_pixels"]) == 19
    assert m["class_pixels"] == np.sum(m["sample_class_pixels"], axis=0).tolist()
    assert not list(out.parent.glob(".*tmp*"))


def test_idx_files_equal_dalis_wds2idx(packed, tmp_path):
    import wds2idx  # ships with nvidia-dali (site-packages/wds2idx.py)

    out, m = packed
    for shard in m["shards"]:
        ref = tmp_path / "ref.idx"
        creator = wds2idx.IndexCreator(str(out / shard["path"]), str(ref), verbose=False)
        creator.create_index()
        creator.close()
        assert (out / shard["index"]).read_text() == ref.read_text()


def test_gnu_tar_with_jpeg_images_exact_labels_and_json(packed, city):
    out, m = packed
    truth = _truth(city, "cityscapes", "train")
    seen = []
    for shard in m["shards"]:
        with tarfile.open(out / shard["path"]) as tf:
            members = tf.getmembers()
            assert all(mem.isreg() for mem in members)
            names = [mem.name for mem in members]
            for i in range(0, len(names), 3):
                key = names[i][: -len(".jpg")]
                assert names[i:i + 3] == [f"{key}.jpg", f"{key}.seg.png", f"{key}.json"]
                meta = json.loads(tf.extractfile(names[i + 2]).read())
                assert meta["key"] == key and meta["dataset"] == "cityscapes" and meta["split"] == "train"
                assert meta["size"] == list(SIZE)
                img = Image.open(io.BytesIO(tf.extractfile(names[i]).read()))
                assert img.format == "JPEG" and img.size == SIZE
                seg = decode_seg(tf.extractfile(names[i + 1]).read())
                assert np.array_equal(seg, truth[meta["source"]])  # label ids exact
                seen.append(meta["source"])
    assert sorted(seen) == sorted(truth)
    assert seen != sorted(seen)  # shuffled at pack time


def test_plain_webdataset_library_reads_the_shards(packed):
    import webdataset as wds

    out, m = packed
    ds = wds.WebDataset([str(out / s["path"]) for s in m["shards"]], shardshuffle=False,
                        nodesplitter=None, workersplitter=None)
    samples = list(ds)
    assert [s["__key__"] for s in samples] == [s["key"] for s in m["samples"]]
    for s, counts in zip(samples, m["sample_class_pixels"]):
        assert set(s) >= {"jpg", "seg.png", "json"}
        seg = decode_seg(s["seg.png"])
        assert np.bincount(seg.ravel(), minlength=256)[:19].tolist() == counts


def test_shard_reader_random_access(packed):
    out, m = packed
    reader = S.ShardReader(S.Manifest.load(out))
    for i in (6, 0, 4):
        comps = reader.read(i)
        assert json.loads(comps["json"])["key"] == m["samples"][i]["key"] == reader.key(i)
    assert set(reader.read(2, exts=("json",))) == {"json"}


def test_pack_is_deterministic_by_seed(city, tmp_path):
    a = pack("cityscapes", city, "val", tmp_path / "a", seed=1, workers=1, progress=False)
    b = pack("cityscapes", city, "val", tmp_path / "b", seed=1, workers=1, progress=False)
    c = pack("cityscapes", city, "val", tmp_path / "c", seed=2, workers=1, progress=False)
    assert a["samples"] == b["samples"] and a["samples"] != c["samples"]
    assert (tmp_path / "a" / a["shards"][0]["path"]).read_bytes() == \
        (tmp_path / "b" / b["shards"][0]["path"]).read_bytes()


def test_test_split_is_packed_without_labels(city, tmp_path):
    m = pack("cityscapes", city, "test", tmp_path / "test", workers=1, progress=False)
    assert not m["labelled"] and m["num_samples"] == 7 and m["class_pixels"] == [0] * 19
    idx = (tmp_path / "test" / m["shards"][0]["index"]).read_text()
    assert "seg.png" not in idx and "\npng " in idx  # evaluation splits: lossless by default


def test_png_images_and_label_ids_fallback(tmp_path):
    root = tmp_path / "cs"
    synth.write_dataset("cityscapes", root, n=3, splits=["val"], size=SIZE)
    truth = _truth(root, "cityscapes", "val")
    for p in (root / "gtFine").rglob("*_labelTrainIds.png"):
        p.unlink()  # only labelIds left: mapped to trainIds on the fly
    m = pack("cityscapes", root, "val", tmp_path / "out", image_format="png", workers=1, progress=False)
    reader = S.ShardReader(S.Manifest.load(tmp_path / "out"))
    for i, s in enumerate(m["samples"]):
        comps = reader.read(i)
        assert "png" in comps and "jpg" not in comps
        assert np.array_equal(decode_seg(comps["seg.png"]), truth[s["source"]])


@pytest.mark.parametrize("dataset", ["gta5", "synthia", "mapillary", "acdc", "nightcity"])
def test_other_layouts_pack_with_exact_labels(tmp_path, dataset):
    root = tmp_path / dataset
    synth.write_dataset(dataset, root, n=2, splits=["train"], size=SIZE)
    truth = {rel: lab for rel, lab in _truth(root, dataset, "train").items()}
    m = pack(dataset, root, "train", tmp_path / "out", workers=1, progress=False)
    reader = S.ShardReader(S.Manifest.load(tmp_path / "out"))
    segs = []
    for i, s in enumerate(m["samples"]):
        segs.append(decode_seg(reader.read(i)["seg.png"]))
        assert np.array_equal(segs[-1], truth[s["source"]])
    # what synth drew, through the dataset's own label encoding and back
    drawn = [synth.sample(0, "train", i, SIZE, "day")[1] for i in range(2)]
    assert sorted(int(np.array_equal(a, b)) for a in segs for b in drawn) == [0, 0, 1, 1]


# ----------------------------------------------------------------------------- bad input
def _fresh(tmp_path, n=3):
    root = tmp_path / "cs"
    synth.write_dataset("cityscapes", root, n=n, splits=["train"], size=SIZE)
    imgs = sorted((root / "leftImg8bit" / "train").rglob("*.png"))
    def lbl(img, kind="labelTrainIds"):
        return root / "gtFine" / "train" / img.parent.name / img.name.replace("_leftImg8bit.png", f"_gtFine_{kind}.png")

    return root, imgs, lbl


def _corrupt(case, imgs, lbl):
    """Break the second sample; returns the file the error must name."""
    img = imgs[1]
    if case == "unreadable image":
        img.write_bytes(b"this is not an image")
        return img
    if case == "truncated image":
        data = img.read_bytes()
        img.write_bytes(data[: len(data) // 2])
        return img
    if case == "missing label":
        lbl(img).unlink()
        lbl(img, "labelIds").unlink()
        return img
    if case == "size mismatch":
        Image.new("L", (SIZE[0] // 2, SIZE[1]), 0).save(lbl(img))
        return lbl(img)
    if case == "label out of range":
        Image.new("L", SIZE, 40).save(lbl(img))
        return lbl(img)
    raise ValueError(case)


BAD = ["unreadable image", "truncated image", "missing label", "size mismatch", "label out of range"]
MESSAGE = {"unreadable image": "unreadable", "truncated image": "truncated",
           "missing label": "missing label", "size mismatch": "32x32 but image",
           "label out of range": "outside the label space"}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_stops_names_the_file_and_leaves_nothing(tmp_path, case):
    root, imgs, lbl = _fresh(tmp_path)
    bad_file = _corrupt(case, imgs, lbl)
    out = tmp_path / "shards" / "train"
    with pytest.raises(DataError) as err:
        pack("cityscapes", root, "train", out, workers=2, progress=False)
    assert str(bad_file) in str(err.value) and MESSAGE[case] in str(err.value)
    assert not out.exists() and not list((tmp_path / "shards").iterdir())


@pytest.mark.parametrize("case", BAD)
def test_skip_bad_lists_skipped_samples(tmp_path, case):
    root, imgs, lbl = _fresh(tmp_path)
    bad_file = _corrupt(case, imgs, lbl)
    m = pack("cityscapes", root, "train", tmp_path / "out", workers=1, skip_bad=True, progress=False)
    assert m["num_samples"] == 2 and len(m["skipped"]) == 1
    assert m["skipped"][0]["source"] == imgs[1].relative_to(root).as_posix()
    assert str(bad_file) in m["skipped"][0]["error"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"] == m["skipped"]


def test_cli_bad_input_exit_2_one_line(tmp_path, capsys):
    root, imgs, lbl = _fresh(tmp_path)
    _corrupt("label out of range", imgs, lbl)
    out = tmp_path / "out"
    rc = cli_main(["pack", "--dataset", "cityscapes", "--root", str(root), "--split", "train",
                   "--out", str(out), "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("eglp pack: error: ") and "label space" in err
    assert not out.exists()


def test_cli_pack_and_synth(tmp_path, capsys):
    assert cli_main(["synth", "--dataset", "cityscapes", "--out", str(tmp_path / "cs"), "--n", "2",
                     "--split", "val", "--size", "64", "32"]) == 0
    assert cli_main(["pack", "--dataset", "cityscapes", "--root", str(tmp_path / "cs"), "--split",
                     "val", "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_samples"] == 2
    # an existing output folder is not overwritten by accident
    assert cli_main(["pack", "--dataset", "cityscapes", "--root", str(tmp_path / "cs"), "--split",
                     "val", "--out", str(tmp_path / "out"), "--workers", "1"]) == 2
    assert "exists" in capsys.readouterr().err


def test_missing_root_and_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        pack("cityscapes", tmp_path / "nope", "train", tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="unknown dataset"):
        pack("kitti", tmp_path, "train", tmp_path / "out", progress=False)
    (tmp_path / "empty" / "leftImg8bit" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        pack("cityscapes", tmp_path / "empty", "train", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


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
