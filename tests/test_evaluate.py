"""eglp eval / predict: one inference path (evaluate.py), 1 rank == 2 ranks (unequal and empty
shares), checkpoint weights (weights.py), server file names and formats (export.py), and
`eglp score` agreeing with evaluate()."""
import argparse
import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_harness import run_ranks
from eglp_dist.cli import main as cli_main
from eglp_dist.data.offline import synth
from eglp_dist.data.labels import CITYSCAPES_LABEL_IDS, TRAIN_TO_CITYSCAPES_ID, colorize
from eglp_dist.data.offline.pack import pack
from eglp_dist.errors import DataError

SIZE = (128, 64)  # W, H of the synthetic images; evaluated at img_scale 96x48, so logits are upsampled


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic Cityscapes (val 7, test 3), ACDC night (val 7), Dark Zurich (val 5) and a
    1-image split, packed; plus a run config pointing at them."""
    base = tmp_path_factory.mktemp("evaluate")
    synth.write_dataset("cityscapes", base / "cs", n=7, splits=["val"], size=SIZE, seed=2)
    synth.write_dataset("cityscapes", base / "cs", n=3, splits=["test"], size=SIZE, seed=5)
    synth.write_dataset("acdc", base / "acdc", n=7, splits=["val"], size=SIZE, seed=3)
    synth.write_dataset("dark_zurich", base / "dz", n=5, splits=["val"], size=SIZE, seed=4)
    synth.write_dataset("cityscapes", base / "one", n=1, splits=["val"], size=SIZE, seed=6)
    shards = {}
    for name, dataset, split in (("cs", "cityscapes", "val"), ("cs", "cityscapes", "test"),
                                 ("acdc", "acdc", "val"), ("dz", "dark_zurich", "val"),
                                 ("one", "cityscapes", "val")):
        shards[f"{name}_{split}"] = str(base / "shards" / f"{name}_{split}")
        pack(dataset, base / name, split, shards[f"{name}_{split}"], shard_size=3, workers=1, progress=False)
    cfg = base / "eval.yaml"
    cfg.write_text(f"""
defaults:
  - model: tiny_daformer
dist:
  backend: gloo
data:
  backend: pil
  num_threads: 1
  val: {{cs: {{shards: {shards['cs_val']}, img_scale: [96, 48]}}}}
  test: {{shards: {shards['cs_test']}, img_scale: [96, 48]}}
""")
    return {"base": base, "cfg": str(cfg), "shards": shards, "ckpt": base / "run" / "checkpoints"}


def _ns(**kw):
    kw.setdefault("overrides", [])
    kw.setdefault("local_rank", None)
    return argparse.Namespace(**kw)


def _make_checkpoint(env, root):
    """A DDP-engine checkpoint of a tiny DAFormer (seed 7) plus a plain 'teacher' module."""
    from omegaconf import OmegaConf

    from eglp_dist.config import EngineConfig, OptimConfig, ScheduleConfig
    from eglp_dist.runtime.checkpoint import save_checkpoint
    from eglp_dist.runtime.engines import build_engine
    from eglp_dist.models import build_segmentor, load_model_config

    torch.manual_seed(7)
    model = build_segmentor(load_model_config("tiny_daformer"))
    teacher = build_segmentor(load_model_config("tiny_daformer"))
    eng = build_engine("student", model, model.param_groups(1e-4, 0.01), OmegaConf.structured(OptimConfig()),
                       OmegaConf.structured(ScheduleConfig(warmup_iters=2)), 10,
                       OmegaConf.structured(EngineConfig(kind="ddp")), env, torch.device("cpu"))
    save_checkpoint(root, 5, {"student": eng}, {"teacher": teacher}, {}, {}, keep_last=2)
    return eng.model.state_dict(), teacher.state_dict()


def _evaluate_split(cfg_path, shards, state, rank, world):
    from eglp_dist.config import load_config
    from eglp_dist.data.loader import build_eval_loader
    from eglp_dist.evaluate import evaluate
    from eglp_dist.weights import load_into
    from eglp_dist.models import build_segmentor

    cfg = load_config(cfg_path, [f"data.val.cs.shards={shards}"])
    model = build_segmentor(cfg.model)
    load_into(model, state, "test")
    loader = build_eval_loader(cfg.data.val.cs, cfg.data, rank, world, "cpu", name="val.cs")
    return evaluate(model, loader, "cpu"), len(loader)


def _two_rank_worker(env, d):
    from eglp_dist.evaluate import run_cli
    from eglp_dist.export import predict_cli
    from eglp_dist.weights import load_weights

    student, teacher = _make_checkpoint(env, d["ckpt"])
    loaded = load_weights(d["ckpt"])  # a run's checkpoints/ folder -> newest complete one
    out = {"round_trip": set(loaded) == set(student) and all(torch.equal(loaded[k], v) for k, v in student.items()),
           "teacher": all(torch.equal(load_weights(d["ckpt"] / "latest", "teacher")[k], v)
                          for k, v in teacher.items())}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert run_cli(_ns(config=d["cfg"], checkpoint=str(d["ckpt"] / "latest"))) == 0
        assert predict_cli(_ns(config=d["cfg"], checkpoint=str(d["ckpt"]), split="val",
                               out=str(d["base"] / "pred2" / "cs"), format="trainid")) == 0
        assert predict_cli(_ns(config=d["cfg"], checkpoint=str(d["ckpt"]), split="val",
                               overrides=[f"data.val.cs.shards={d['shards']['acdc_val']}"],
                               out=str(d["base"] / "pred2" / "acdc"), format="trainid")) == 0
    out["stdout"] = buf.getvalue()
    for name in ("cs_val", "one_val"):
        res, n = _evaluate_split(d["cfg"], d["shards"][name], loaded, env.rank, env.world_size)
        out[name] = (res.confusion, n, res.miou)
    return out


@pytest.fixture(scope="module")
def two_ranks(data):
    return run_ranks(_two_rank_worker, 2, args=(data,))


@pytest.fixture(scope="module")
def weights(two_ranks, data):
    from eglp_dist.weights import load_weights

    return load_weights(data["ckpt"])


@pytest.fixture
def own_env():
    """In-process CLI runs create (and end) a one-rank process group and export RANK etc.;
    give the rest of the session its environment back."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# ----------------------------------------------------------------------------- evaluate


def test_two_ranks_give_the_single_rank_confusion_matrix(two_ranks, data, weights):
    for name, shares in (("cs_val", [3, 4]), ("one_val", [0, 1])):  # unequal, and one empty share
        single, n = _evaluate_split(data["cfg"], data["shards"][name], weights, 0, 1)
        assert n == sum(shares) and single.confusion.sum() > 0
        for rank in range(2):
            matrix, n_rank, miou = two_ranks[rank][name]
            assert n_rank == shares[rank]
            assert torch.equal(matrix, single.confusion), name
            assert miou == single.miou


def test_evaluate_restores_modes_and_honours_max_batches(data, weights):
    from eglp_dist.config import load_config
    from eglp_dist.data.loader import build_eval_loader
    from eglp_dist.evaluate import evaluate
    from eglp_dist.models import build_segmentor

    cfg = load_config(data["cfg"])
    model = build_segmentor(cfg.model)
    model.load_state_dict(weights)
    model.train()
    model.head.eval()  # a deliberately frozen part keeps its mode
    loader = build_eval_loader(cfg.data.val.cs, cfg.data, 0, 1, "cpu", name="val.cs")
    res = evaluate(model, loader, "cpu", max_batches=2)
    assert model.training and not model.head.training
    assert 0 < res.confusion.sum() <= 2 * SIZE[0] * SIZE[1]
    assert torch.is_grad_enabled()  # grad mode untouched for the caller
    test_loader = build_eval_loader(cfg.data.test, cfg.data, 0, 1, "cpu", name="test")
    with pytest.raises(DataError, match="no labels"):
        evaluate(model, test_loader, "cpu")


# ----------------------------------------------------------------------------- weights


def test_load_weights_round_trip_and_errors(two_ranks, data, weights, tmp_path):
    from eglp_dist.weights import load_weights

    assert all(r["round_trip"] and r["teacher"] for r in two_ranks)
    iter_dir = data["ckpt"] / "iter_0000005"
    for path in (iter_dir, data["ckpt"] / "latest", data["ckpt"].parent):  # folder, link, run folder
        got = load_weights(path)
        assert set(got) == set(weights) and all(torch.equal(got[k], weights[k]) for k in got)
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())

    with pytest.raises(DataError, match=r"no engine 'nfnet' \(engines: student; plain modules: teacher\)") as e:
        load_weights(iter_dir, "nfnet")
    assert str(iter_dir) in str(e.value)
    broken = tmp_path / "checkpoints" / "iter_0000009"
    (broken / "engines" / "student").mkdir(parents=True)
    with pytest.raises(DataError, match="no COMPLETE marker") as e:
        load_weights(broken)
    assert str(broken) in str(e.value)
    with pytest.raises(DataError, match="holds no complete"):
        load_weights(tmp_path)
    with pytest.raises(DataError, match="no such checkpoint"):
        load_weights(tmp_path / "nowhere")

    # plain state_dict files: bare, under "state_dict" or "model", DDP "module." prefixes
    for i, obj in enumerate([weights, {"state_dict": weights}, {"model": weights, "iter": 3},
                             {f"module.{k}": v for k, v in weights.items()}]):
        torch.save(obj, tmp_path / f"w{i}.pth")
        got = load_weights(tmp_path / f"w{i}.pth")
        assert set(got) == set(weights) and all(torch.equal(got[k], weights[k]) for k in got)
    torch.save([1, 2], tmp_path / "bad.pt")
    with pytest.raises(DataError, match="bad.pt: not a state dict"):
        load_weights(tmp_path / "bad.pt")


def test_eval_cli_strict_weights_mismatch_is_one_line_exit_2(two_ranks, data, capsys, own_env):
    rc = cli_main(["eval", data["cfg"], str(data["ckpt"]), "model.head.channels=16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "iter_0000005: weights do not fit the config's model" in err[0] and "shape mismatch" in err[0]


# ----------------------------------------------------------------------------- CLI


def test_eval_cli_two_ranks_table_and_json(two_ranks, data, weights):
    single, _ = _evaluate_split(data["cfg"], data["shards"]["cs_val"], weights, 0, 1)
    assert "mIoU" in two_ranks[0]["stdout"] and "road" in two_ranks[0]["stdout"]
    assert "mIoU" not in two_ranks[1]["stdout"]  # rank 0 prints
    assert "wrote 7 files for 7 images" in two_ranks[0]["stdout"]
    assert not (data["ckpt"] / "iter_0000005" / "eval_val.json").exists()  # a checkpoint is read-only to eval
    result = json.loads((data["ckpt"].parent / "eval" / "iter_0000005_val.json").read_text())
    assert result["mIoU"] == pytest.approx(single.miou)  # the average over the one target
    cs = result["targets"]["cs"]
    assert cs["mIoU"] == pytest.approx(single.miou) and cs["mIoU_all"] == cs["mIoU"]
    assert len(cs["IoU"]) == 19 and cs["num_images"] == 7 and result["shards"] == {"cs": data["shards"]["cs_val"]}
    assert not list((data["ckpt"] / "iter_0000005").glob(".*tmp"))


def _pngs(folder):
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())


def _read(path):
    with Image.open(path) as im:
        return im.mode, im.size, np.asarray(im)


def test_predict_cityscapes_names_formats_sizes_and_score(two_ranks, data, weights, own_env, capsys):
    base = data["base"]
    for fmt in ("trainid", "labelid", "color"):
        assert cli_main(["predict", data["cfg"], str(data["ckpt"]), "--out", str(base / "pred1" / fmt),
                         "--format", fmt]) == 0
    out = capsys.readouterr().out
    assert "wrote 7 files for 7 images (cityscapes val, format color)" in out
    images = sorted(p.relative_to(base / "cs" / "leftImg8bit" / "val").as_posix()
                    for p in (base / "cs" / "leftImg8bit" / "val").rglob("*.png"))
    assert len(images) == 7 and images[0].endswith("_leftImg8bit.png")
    for fmt in ("trainid", "labelid", "color"):  # <city>/<image file name>, as the image tree
        assert _pngs(base / "pred1" / fmt) == images
    assert _pngs(base / "pred2" / "cs") == images  # the 2-rank run wrote the same files...
    for name in images:
        mode, size, train = _read(base / "pred1" / "trainid" / name)
        assert mode == "L" and size == SIZE and train.max() < 19
        assert np.array_equal(_read(base / "pred2" / "cs" / name)[2], train)  # ... with the same pixels
        mode, size, label = _read(base / "pred1" / "labelid" / name)
        assert mode == "L" and size == SIZE and np.array_equal(label, TRAIN_TO_CITYSCAPES_ID[train])
        assert set(np.unique(label)) <= set(CITYSCAPES_LABEL_IDS)
        mode, size, rgb = _read(base / "pred1" / "color" / name)
        assert mode == "RGB" and size == SIZE and np.array_equal(rgb, colorize(train))

    # `eglp score` of the exported predictions == evaluate() of the same model
    single, _ = _evaluate_split(data["cfg"], data["shards"]["cs_val"], weights, 0, 1)
    gt = base / "cs" / "gtFine" / "val"
    for fmt in ("trainid", "labelid"):
        js = base / f"score_{fmt}.json"
        assert cli_main(["score", "--pred", str(base / "pred1" / fmt), "--gt", str(gt), "--json", str(js)]) == 0
        assert json.loads(js.read_text())["mIoU"] == pytest.approx(single.miou, abs=1e-12)
    from eglp_dist.score import score_folders

    matrix, problems, _ = score_folders(base / "pred1" / "trainid", gt)
    assert np.array_equal(matrix, single.confusion.numpy()) and not any(problems.values())

    # unlabelled test split: predictions at the original size of each image
    assert cli_main(["predict", data["cfg"], str(data["ckpt"]), "--split", "test",
                     "--out", str(base / "pred1" / "test")]) == 0
    names = _pngs(base / "pred1" / "test")
    assert len(names) == 3 and all(_read(base / "pred1" / "test" / n)[1] == SIZE for n in names)
    assert not [p for p in (base / "pred1").rglob("*") if p.name.startswith(".")]  # no temporaries


def test_predict_acdc_and_dark_zurich_server_layouts(two_ranks, data, weights, own_env, capsys):
    base = data["base"]
    acdc_images = sorted(p.name for p in (base / "acdc" / "rgb_anon").rglob("*_rgb_anon.png"))
    assert len(acdc_images) == 7
    # ACDC: flat labelTrainIds/<image name>, trainIds at the image's size
    assert _pngs(base / "pred2" / "acdc") == [f"labelTrainIds/{n}" for n in acdc_images]
    for n in acdc_images:
        mode, size, arr = _read(base / "pred2" / "acdc" / "labelTrainIds" / n)
        assert mode == "L" and size == SIZE and arr.max() < 19
    # Dark Zurich: labelTrainIds/, labelTrainIds_invalid/ and 16-bit confidence/
    out = base / "pred1" / "dz"
    assert cli_main(["predict", data["cfg"], str(data["ckpt"]), f"data.val.cs.shards={data['shards']['dz_val']}",
                     "--out", str(out)]) == 0
    assert "wrote 15 files for 5 images" in capsys.readouterr().out
    dz_images = sorted(p.name for p in (base / "dz" / "rgb_anon").rglob("*_rgb_anon.png"))
    assert _pngs(out) == sorted(f"{d}/{n}" for d in ("confidence", "labelTrainIds", "labelTrainIds_invalid")
                                for n in dz_images)
    for n in dz_images:
        _, size, train = _read(out / "labelTrainIds" / n)
        assert size == SIZE and np.array_equal(_read(out / "labelTrainIds_invalid" / n)[2], train)
        mode, size, conf = _read(out / "confidence" / n)
        assert size == SIZE and mode.startswith("I") and conf.min() >= 65535 // 19 and conf.max() <= 65535
    # `eglp score` picks the labels out of the submission's three folders; == evaluate()
    from eglp_dist.score import score_folders

    matrix, problems, _ = score_folders(out, base / "dz" / "gt")
    single, _ = _evaluate_split(data["cfg"], data["shards"]["dz_val"], weights, 0, 1)
    assert np.array_equal(matrix, single.confusion.numpy()) and not any(problems.values())


def test_prediction_names_and_atomic_write(tmp_path, monkeypatch):
    from eglp_dist import export as ev

    cases = [
        ({"source": "leftImg8bit/test/berlin/berlin_000000_000019_leftImg8bit.png", "dataset": "cityscapes",
          "split": "test"}, "trainid", {"pred": "berlin/berlin_000000_000019_leftImg8bit.png"}),
        ({"source": "leftImg8bit_foggy/val/lindau/lindau_000000_000019_leftImg8bit_foggy_beta_0.02.png",
          "dataset": "foggy_cityscapes", "split": "val"}, "labelid",
         {"pred": "lindau/lindau_000000_000019_leftImg8bit_foggy_beta_0.02.png"}),
        ({"source": "rgb_anon/snow/test/GP010122/GP010122_frame_000001_rgb_anon.png", "dataset": "acdc_snow",
          "split": "test"}, "color", {"pred": "color/GP010122_frame_000001_rgb_anon.png"}),
        ({"source": "rgb_anon/test/night/GOPR0356/GOPR0356_frame_000321_rgb_anon.png", "dataset": "dark_zurich",
          "split": "test"}, "labelid", {"pred": "labelIds/GOPR0356_frame_000321_rgb_anon.png"}),
        ({"source": "images/val/7d06fefd-f7be05a6.jpg", "dataset": "bdd100k", "split": "val"}, "trainid",
         {"pred": "7d06fefd-f7be05a6.png"}),
    ]
    for meta, fmt, expected in cases:
        assert ev.prediction_paths(meta, fmt) == expected, meta["source"]
    writer = ev.PredictionWriter(tmp_path, "trainid")
    dup = [{"source": f"rgb_anon/{c}/val/S/S_frame_000001_rgb_anon.png", "dataset": "acdc", "split": "val"}
           for c in ("night", "fog")]
    with pytest.raises(DataError, match="would both be written to labelTrainIds/S_frame_000001_rgb_anon.png"):
        writer.check_names(dup)

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ev.write_png_atomic(tmp_path / "a" / "x.png", np.zeros((4, 4), np.uint8))
    assert list((tmp_path / "a").iterdir()) == []  # neither the file nor a temporary
