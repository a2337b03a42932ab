"""Safe by default: no command destroys a user's data or reports a wrong result with exit 0.

One test per case of the safe-defaults issue, each with real files and real processes (the
CLI as a user runs it); each failed before its fix. score's cases live in test_score.py.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eglp_dist.config import PACKAGE_CONFIG_ROOT, load_config
from eglp_dist.data.offline import synth
from eglp_dist.data.offline.pack import pack
from eglp_dist.errors import ConfigError, DataError
from training_runs import night_overrides

DEMO = PACKAGE_CONFIG_ROOT / "demo"
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def eglp(*args, timeout=240, **kw):
    return subprocess.run([sys.executable, "-m", "eglp_dist", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=ENV, **kw)


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    root = tmp_path_factory.mktemp("city")
    synth.write_dataset("cityscapes", root, n=6, splits=["train"], size=(64, 32), seed=1)
    return root


def run_args(tiny_shards, out, *extra):
    return night_overrides(tiny_shards, out, "trainer.image_interval=1000", "data.source.crop_size=[64,64]",
                           "data.target.crop_size=[64,64]", "model=tiny_daformer", *extra)


# ---------------------------------------------------------------- 1. pack --overwrite


def test_pack_refuses_an_out_that_is_or_lies_in_the_dataset(city, tmp_path):
    (city / "NOTES.txt").write_text("mine")
    before = sorted(p.relative_to(city) for p in city.rglob("*"))
    for out in (city, city / "shards", city.parent):
        proc = eglp("pack", "--dataset", "cityscapes", "--root", city, "--split", "train",
                    "--out", out, "--overwrite")
        assert proc.returncode == 2, proc.stderr
        assert "the dataset root" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.relative_to(city) for p in city.rglob("*")) == before
    assert (city / "NOTES.txt").read_text() == "mine"


def test_overwrite_replaces_only_a_shard_folder_of_ours(city, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    a_file = tmp_path / "file.txt"
    a_file.write_text("y")
    with pytest.raises(DataError, match="not a shard folder written by `eglp pack`"):
        pack("cityscapes", city, "train", mine, overwrite=True, progress=False)
    with pytest.raises(DataError, match="exists and is not a folder"):
        pack("cityscapes", city, "train", a_file, overwrite=True, progress=False)
    assert (mine / "thesis.tex").read_text() == "x" and a_file.read_text() == "y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "mine"]  # no stray .old/.tmp
    out = tmp_path / "shards"
    pack("cityscapes", city, "train", out, progress=False, seed=0)
    first = json.loads((out / "manifest.json").read_text())["samples"]
    pack("cityscapes", city, "train", out, progress=False, seed=1, overwrite=True)
    second = json.loads((out / "manifest.json").read_text())["samples"]
    assert [s["key"] for s in first] != [s["key"] for s in second]  # really replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "mine", "shards"]


# ---------------------------------------------------------------- 2. interrupted pack


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_pack_cleans_up_and_says_one_line(tmp_path, sig):
    root = tmp_path / "raw"
    synth.write_dataset("cityscapes", root, n=40, splits=["train"], size=(512, 256), seed=2)
    out = tmp_path / "shards"
    proc = subprocess.Popen([sys.executable, "-m", "eglp_dist", "pack", "--dataset", "cityscapes",
                             "--root", str(root), "--split", "train", "--out", str(out),
                             "--workers", "2", "--image-format", "png"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            # SIGINT deliverable even when pytest itself runs in the background
                            # (a non-interactive shell's `&` starts it with SIGINT ignored, which
                            # children inherit and Python then respects)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while not list(tmp_path.glob(".shards.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "pack finished before it could be interrupted"
    time.sleep(0.3)  # well inside the work: the temporary holds shards by now
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    lines = [row for row in stderr.splitlines() if not row.startswith("pack cityscapes/train:")]
    assert lines == [f"eglp pack: interrupted ({sig.name}); partial output removed"], stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no .shards.tmp-*, no shards


def test_a_killed_packs_leftovers_are_removed_by_the_next_pack(city, tmp_path):
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = socket.gethostname().replace("-", "_")
    stale = tmp_path / f".shards.tmp-{host}-{dead}"
    (stale / "x").mkdir(parents=True)
    live_elsewhere = tmp_path / f".shards.tmp-otherhost-{dead}"  # another host's: never judged
    live_elsewhere.mkdir()
    pack("cityscapes", city, "train", tmp_path / "shards", progress=False)
    assert not stale.exists() and live_elsewhere.exists()


# ---------------------------------------------------------------- 3. one job per run folder


def _lock(run_dir: Path):
    return json.loads((run_dir / "LOCK").read_text())


def test_a_second_job_on_a_run_folder_is_refused_and_a_dead_ones_lock_taken_over(tiny_shards, tmp_path):
    args = run_args(tiny_shards, tmp_path, "trainer.max_iters=100000", "trainer.eval_interval=100000",
                    "trainer.ckpt_interval=100000", "run.name=shared")
    first = subprocess.Popen([sys.executable, "-m", "eglp_dist", "train", str(DEMO / "tiny_source_only.yaml"),
                              *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    run_dir = tmp_path / "shared"
    try:
        deadline = time.time() + 120
        while not (run_dir / "LOCK").is_file() and time.time() < deadline:
            assert first.poll() is None, first.stdout.read()
            time.sleep(0.1)
        holder = _lock(run_dir)
        assert holder["pid"] == first.pid
        second = eglp("train", DEMO / "tiny_source_only.yaml", *args)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"run folder {run_dir} is in use by another job (host {holder['host']}, pid {first.pid}" \
            in second.stderr
        assert _lock(run_dir)["pid"] == first.pid  # the refused job left the lock alone
    finally:
        first.kill()
        first.wait()
    # the holder died without releasing: the next job takes over, with a warning
    third = eglp("train", DEMO / "tiny_source_only.yaml",
                 *run_args(tiny_shards, tmp_path, "trainer.max_iters=1", "run.name=shared",
                           "trainer.eval_interval=100"))
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"taking over the lock of a job that is gone (host {holder['host']}, pid {first.pid}" in third.stderr
    assert not (run_dir / "LOCK").exists()  # released at the end


# ---------------------------------------------------------------- 4. GROUP=NAME replaces


def test_a_group_on_the_command_line_replaces_the_node():
    cfg = load_config(DEMO / "tiny_source_only.yaml", ["model=tiny_daformer"])
    assert cfg.model.name == "tiny_daformer" and not cfg.model.hrda.enabled
    assert cfg.model.test_window is None  # no stale key of tiny_hrda
    cfg = load_config(DEMO / "tiny_source_only.yaml", ["model.drop_path_rate=0.3", "model=tiny_deeplabv3plus"])
    assert cfg.model.head.type == "deeplabv3plus" and not cfg.model.hrda.enabled
    assert cfg.model.drop_path_rate == 0.3  # value overrides apply after the group, whatever the order
    assert load_config(DEMO / "tiny_uda.yaml", ["engine=zero2"]).engine.kind == "zero2"


def test_a_group_the_file_does_not_select_replaces_the_whole_node(tmp_path):
    configs = tmp_path / "configs"
    (configs / "exp").mkdir(parents=True)
    (configs / "model").mkdir()
    for name in ("tiny_daformer.yaml",):
        (configs / "model" / name).write_text((PACKAGE_CONFIG_ROOT / "model" / name).read_text())
    (configs / "exp" / "a.yaml").write_text("model:\n  name: mine\n  hrda: {enabled: true}\n"
                                            "  test_window: [64, 64]\n")
    cfg = load_config(configs / "exp" / "a.yaml", ["model=tiny_daformer"])
    assert cfg.model.name == "tiny_daformer" and not cfg.model.hrda.enabled and cfg.model.test_window is None


# ------------------------------------------------- 5. a rerun with other settings, 11. start


def test_a_path_named_another_way_is_the_same_setting(tmp_path, monkeypatch):
    """A run resumed from another working directory (``runs/x`` then ``/abs/runs/x``, or a
    study folder reached through a symlink) continues; a path that is really another one, or
    that does not exist from here, still stops the resume."""
    from eglp_dist.run_folder import config_differences

    (tmp_path / "runs" / "shards").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    trained = {"data": {"source": {"shards": "runs/shards"}}, "model": {"init_from": "gone/ckpt"}}
    for same in (str(tmp_path / "runs" / "shards"), "link/shards", "./runs/shards"):
        assert config_differences(trained, {**trained, "data": {"source": {"shards": same}}}) == []
    assert config_differences(trained, {**trained, "data": {"source": {"shards": "other"}}}) == [
        "data.source.shards: 'runs/shards' -> 'other'"]
    assert config_differences(trained, {**trained, "model": {"init_from": str(tmp_path / "gone/ckpt")}}) == [
        f"model.init_from: 'gone/ckpt' -> '{tmp_path / 'gone/ckpt'}'"]


def test_a_rerun_with_changed_settings_does_not_resume_the_old_run(tiny_shards, tmp_path):
    cfg = DEMO / "tiny_source_only.yaml"
    base = run_args(tiny_shards, tmp_path, "trainer.eval_interval=100", "trainer.ckpt_interval=1")
    first = eglp("train", cfg, *base, "trainer.max_iters=1")
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "demo_source_only"
    # 11. first contact: where the run is, on how many ranks, with which engine
    assert f"run folder {run_dir} | 1 rank(s)" in first.stdout and "engine ddp" in first.stdout
    changed = eglp("train", cfg, *base, "trainer.max_iters=1", "optim.lr=0.001", "run.seed=3")
    assert changed.returncode == 2, changed.stderr[-3000:]
    assert "was trained with another config" in changed.stderr
    assert "optim.lr: 0.0006 -> 0.001" in changed.stderr and "run.seed: 0 -> 3" in changed.stderr
    assert "another run.name" in changed.stderr and "trainer.resume=never" in changed.stderr
    assert "run already complete" not in changed.stdout
    fresh_over_old = eglp("train", cfg, *base, "trainer.max_iters=1", "trainer.resume=never")
    assert fresh_over_old.returncode == 2 and "already holds checkpoints" in fresh_over_old.stderr
    # result-neutral keys (a longer run, other log/eval intervals) do resume
    longer = eglp("train", cfg, *base, "trainer.max_iters=2", "trainer.log_interval=2")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "resumed from" in longer.stdout and "at iteration 1" in longer.stdout
    assert "trainer.max_iters changed from 1 to 2: from iteration 1 on, the lr schedule" in longer.stdout
    assert (run_dir / "checkpoints" / "iter_0000002" / "COMPLETE").is_file()
    attempts = sorted((run_dir / "attempts").glob("*.yaml"))
    assert [p.name for p in attempts] == ["001.yaml", "002.yaml"]  # refused attempts record nothing
    assert "max_iters: 1\n" in attempts[0].read_text() and "max_iters: 2\n" in attempts[1].read_text()
    assert (run_dir / "config.yaml").read_text() == attempts[1].read_text()


# ---------------------------------------------------------------- 7. swapped shard files


@pytest.fixture()
def three_shards(city, tmp_path):
    out = tmp_path / "s"
    pack("cityscapes", city, "train", out, shard_size=2, progress=False)
    return out


def _stream(folder):
    from eglp_dist.data.loader import build_train_stream

    cfg = load_config(DEMO / "tiny_source_only.yaml", [f"data.source.shards={folder}"])
    return build_train_stream(cfg.data.source, cfg.data, name="source")


def _swap(a: Path, b: Path):
    tmp = a.with_name("swap")
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)


def test_a_shard_pair_swapped_with_another_is_refused(three_shards):
    _stream(three_shards).close()  # intact: opens
    for ext in ("tar", "idx"):
        _swap(three_shards / f"cityscapes-train-000000.{ext}", three_shards / f"cityscapes-train-000001.{ext}")
    with pytest.raises(DataError, match="cityscapes-train-000000.idx: sample 0 is .* this index belongs to "
                                        "another shard"):
        _stream(three_shards)


def test_a_tar_swapped_under_its_index_is_refused(three_shards):
    _swap(three_shards / "cityscapes-train-000000.tar", three_shards / "cityscapes-train-000001.tar")
    with pytest.raises(DataError, match="cityscapes-train-000000.tar: holds .*tar and index do not "
                                        "belong together"):
        _stream(three_shards)


def test_evaluation_shards_are_checked_when_the_loader_is_built(three_shards):
    from eglp_dist.data.loader import build_eval_loader

    cfg = load_config(DEMO / "tiny_source_only.yaml", [f"data.val.acdc_night.shards={three_shards}"])
    build_eval_loader(cfg.data.val.acdc_night, cfg.data, name="val.acdc_night")
    _swap(three_shards / "cityscapes-train-000001.idx", three_shards / "cityscapes-train-000002.idx")
    with pytest.raises(DataError, match="cityscapes-train-000001.idx"):
        build_eval_loader(cfg.data.val.acdc_night, cfg.data, name="val.acdc_night")


# ------------------------------------- 8. evaluation data at start-up, checkpoint first


def _strip_labels(folder: Path):
    """The index of shard 0 without its seg.png entries: a labelled split missing labels."""
    idx = folder / "acdc-val-000000.idx"
    lines = idx.read_text().splitlines()
    out = [lines[0]]
    for line in lines[1:]:
        f = line.split()
        out.append(" ".join(x for i in range(0, len(f), 4) if f[i] != "seg.png" for x in f[i:i + 4]))
    idx.write_text("\n".join(out) + "\n")


def _corrupt_first_image(folder: Path):
    from eglp_dist.data.shards import read_idx

    idx = folder / "acdc-val-000000.idx"
    ext = "png"  # evaluation splits are packed losslessly
    off, size, _ = next(c[ext] for c in read_idx(idx) if ext in c)
    with open(folder / "acdc-val-000000.tar", "r+b") as f:
        f.seek(off + 8)  # keep the PNG signature, so it is a corrupt PNG, not another file type
        f.write(b"\0" * (size - 8))


def test_bad_evaluation_data_stops_the_run_before_its_first_step(tiny_shards, tmp_path):
    import shutil

    val = tmp_path / "val"
    shutil.copytree(tiny_shards["acdc_night_val"], val)
    _strip_labels(val)
    proc = eglp("train", DEMO / "tiny_source_only.yaml",
                *run_args(tiny_shards, tmp_path / "runs", "trainer.max_iters=2", f"data.val.acdc_night.shards={val}"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "acdc-val-000000.tar:" in proc.stderr and "has no seg.png" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


def test_a_corrupt_evaluation_image_names_shard_and_key_and_costs_no_checkpoint(tiny_shards, tmp_path):
    import shutil

    val = tmp_path / "val"
    shutil.copytree(tiny_shards["acdc_night_val"], val)
    _corrupt_first_image(val)
    proc = eglp("train", DEMO / "tiny_source_only.yaml",
                *run_args(tiny_shards, tmp_path, "trainer.max_iters=2", "trainer.eval_interval=1",
                          "trainer.ckpt_interval=1", f"data.val.acdc_night.shards={val}"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{val / 'acdc-val-000000.tar'}:" in proc.stderr and "unreadable or truncated image" in proc.stderr
    assert (tmp_path / "demo_source_only" / "checkpoints" / "iter_0000001" / "COMPLETE").is_file()


# ---------------------------------------------------------------- 9. truncated checkpoint


def test_a_truncated_checkpoint_file_is_named(tiny_shards, tmp_path):
    args = run_args(tiny_shards, tmp_path, "trainer.max_iters=1", "trainer.eval_interval=100")
    assert eglp("train", DEMO / "tiny_source_only.yaml", *args).returncode == 0
    ckpt = tmp_path / "demo_source_only" / "checkpoints" / "iter_0000001"
    engine_file = ckpt / "engines" / "student" / "engine.pt"
    with open(engine_file, "r+b") as f:
        f.truncate(engine_file.stat().st_size // 2)
    longer = [a for a in args if not a.startswith("trainer.max_iters")] + ["trainer.max_iters=2"]
    train, evaluate = (eglp("train", DEMO / "tiny_source_only.yaml", *longer),
                       eglp("eval", DEMO / "tiny_source_only.yaml", ckpt, *args))
    for proc in (train, evaluate):
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
    # resume checks the sizes its COMPLETE lists (the only checkpoint: no silent restart)
    assert f"checkpoint {ckpt} is damaged ({engine_file} has" in train.stderr, train.stderr[-3000:]
    assert f"{engine_file}: checkpoint file is truncated or corrupt" in evaluate.stderr, evaluate.stderr[-3000:]


# ------------------------------------------------------- 10. plain words for bad input


def test_synth_refuses_a_zero_size():
    proc = eglp("synth", "--dataset", "cityscapes", "--out", "/nonexistent/never", "--size", "0", "0")
    assert proc.returncode == 2 and "--size must be two numbers W H, each >= 32, got 0 0" in proc.stderr


@pytest.mark.parametrize("override,message", [
    ("data.source=3", "config key 'data.source' (in command line 'data.source=3') is a section "
                      "(with keys shards, batch_size"),
    ("data=3", "config key 'data' (in command line 'data=3') is a section"),
    ("data.source.crop_size=5", "config key 'data.source.crop_size' (in command line "
                                "'data.source.crop_size=5') takes a list, e.g. data.source.crop_size=[1,2]; "
                                "got the single value 5"),
])
def test_config_errors_on_a_whole_node_or_a_list_speak_plainly(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO / "tiny_uda.yaml", [override])
    assert message in str(err.value)
    assert "'?'" not in str(err.value) and "AnyNode" not in str(err.value)


# ------------------------------------------------------------------ 11. non-TTY progress


def test_progress_in_a_log_file_is_one_plain_line_per_step_of_work(city, tmp_path):
    proc = eglp("pack", "--dataset", "cityscapes", "--root", city, "--split", "train", "--out", tmp_path / "s")
    assert proc.returncode == 0
    assert "\r" not in proc.stderr
    lines = [row for row in proc.stderr.splitlines() if row.startswith("pack cityscapes/train:")]
    assert lines and lines[-1].startswith("pack cityscapes/train: 6/6 img")


# ---------------------------------------------------------------- a run that would never evaluate


@pytest.mark.parametrize("config", ["tiny_source_only.yaml", "tiny_spn.yaml"])
def test_a_run_with_no_evaluable_validation_stream_is_refused_unless_evaluation_is_off(config, tmp_path):
    from eglp_dist.train import check_evaluable

    cfg = load_config(DEMO / config, [f"run.out_dir={tmp_path}"])
    assert not any(t.shards for t in cfg.data.val.values())
    with pytest.raises(ConfigError, match=r"no validation stream to evaluate: data\.val\.\w+\.shards.*"
                                          r"trainer\.eval_interval=0"):
        check_evaluable(cfg)
    check_evaluable(load_config(DEMO / config, ["trainer.eval_interval=0"]))  # said explicitly: accepted
    name = next(iter(cfg.data.val))
    check_evaluable(load_config(DEMO / config, [f"data.val.{name}.shards=somewhere"]))


def test_eglp_train_without_validation_shards_exits_2_before_making_the_run_folder(tiny_shards, tmp_path):
    proc = eglp("train", DEMO / "tiny_source_only.yaml", f"run.out_dir={tmp_path / 'runs'}",
                f"data.source.shards={tiny_shards['cityscapes_train']}", "trainer.max_iters=2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "data.val.acdc_night.shards empty" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()
