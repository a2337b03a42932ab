"""DDP and DeepSpeed ZeRO-1/2 behind one interface, with 2 real gloo ranks."""
import pytest
import torch

from dist_harness import run_ranks
from tiny_models import batch, make_tiny
from eglp_dist.config import PACKAGE_CONFIG_ROOT, load_config

KINDS = ["ddp", "zero1", "zero2"]


def _engine(env, kind, grad_accum=1, lr=1e-2, model=None, seed=0):
    from omegaconf import OmegaConf

    from eglp_dist.config import EngineConfig, OptimConfig, ScheduleConfig
    from eglp_dist.runtime.engines import build_engine

    model = model if model is not None else make_tiny(seed)
    ecfg = OmegaConf.structured(EngineConfig(kind=kind, grad_accum=grad_accum))
    ocfg = OmegaConf.structured(OptimConfig(lr=lr))
    scfg = OmegaConf.structured(ScheduleConfig(warmup_iters=2))
    return build_engine(kind, model, model.param_groups(lr, 0.01), ocfg, scfg, 20, ecfg, env,
                        torch.device("cpu"))


def _train(eng, env, steps, start=0, split=1):
    for step in range(start, start + steps):
        x, y = batch(env.rank, step, n=2)
        # `split` backward calls per iteration (as DACS does) must equal one on the whole loss.
        for xs, ys in zip(x.chunk(split), y.chunk(split)):
            eng.backward(eng.call("forward_train", xs, ys) / split)
        eng.step()


def _three_engines_same_data(env):
    out = {}
    for kind in KINDS:
        eng = _engine(env, kind)
        _train(eng, env, 4, split=2 if kind == "zero2" else 1)
        out[kind] = (eng.state_dict_fp32(), eng.optimizer_state_bytes(), eng.lrs())
    return out


def test_ddp_zero1_zero2_same_weights_and_zero2_partitions_optimizer_state():
    res = run_ranks(_three_engines_same_data, 2)
    ref = res[0]["ddp"][0]
    start = make_tiny(0).state_dict()
    assert any((ref[k] - start[k]).abs().max() > 1e-4 for k in ref), "training did not move the weights"
    for rank in range(2):
        for kind in KINDS:
            weights, _, lrs = res[rank][kind]
            for k in ref:
                torch.testing.assert_close(weights[k], ref[k], rtol=1e-5, atol=1e-6, msg=f"{kind} rank{rank} {k}")
            assert lrs == pytest.approx(res[0]["ddp"][2])
    # the head group runs at 10x the encoder's lr
    assert res[0]["ddp"][2][1] == pytest.approx(10 * res[0]["ddp"][2][0])
    ddp_bytes = res[0]["ddp"][1]["moments"]
    for kind in ["zero1", "zero2"]:
        held = res[0][kind][1]
        ratio = held["moments"] / ddp_bytes
        total_ratio = (held["moments"] + held["master"]) / ddp_bytes
        print(f"{kind}: Adam state per rank {held['moments']} B vs DDP {ddp_bytes} B -> {ratio:.3f}x; "
              f"with DeepSpeed's fp32 master partition {total_ratio:.3f}x")
        assert ratio <= 0.6


def _accumulation(env, kind):
    whole = _engine(env, kind)
    for step in range(3):
        x, y = batch(env.rank, step, n=4)
        whole.backward(whole.call("forward_train", x, y))
        whole.step()
    accum = _engine(env, kind, grad_accum=2)
    for step in range(3):
        x, y = batch(env.rank, step, n=4)
        for xs, ys in zip(x.chunk(2), y.chunk(2)):
            accum.backward(accum.call("forward_train", xs, ys))
            assert accum.step() == (not accum.at_boundary and accum.micro_steps % 2 == 0)
    return whole.state_dict_fp32(), accum.state_dict_fp32()


@pytest.mark.parametrize("kind", ["ddp", "zero2"])
def test_gradient_accumulation_equals_the_whole_batch(kind):
    for whole, accum in run_ranks(_accumulation, 2, args=(kind,)):
        for k in whole:
            torch.testing.assert_close(accum[k], whole[k], rtol=1e-5, atol=1e-6)


def _two_engines_and_teacher(env):
    """EGLP's shape: student and NFNet, two optimised models with different engines, plus an
    EMA teacher of the student, interleaved in one process."""
    from eglp_dist.methods.parts.ema import EMATeacher

    student = _engine(env, "zero2", seed=0)
    nfnet = _engine(env, "ddp", seed=1, lr=5e-3)
    teacher = EMATeacher(student.model, alpha=0.9)
    for step in range(3):
        x, y = batch(env.rank, step)
        student.backward(student.call("forward_train", x, y))
        nfnet.backward(nfnet.call("forward_train", x.flip(-1), y.flip(-1)))
        student.step()
        nfnet.step()
        teacher.update(student.model, step + 1)
    return student.state_dict_fp32(), nfnet.state_dict_fp32(), teacher.state_dict()


def _single_engine_reference(env, kind, seed, lr, flip):
    eng = _engine(env, kind, seed=seed, lr=lr)
    for step in range(3):
        x, y = batch(env.rank, step)
        if flip:
            x, y = x.flip(-1), y.flip(-1)
        eng.backward(eng.call("forward_train", x, y))
        eng.step()
    return eng.state_dict_fp32()


# slow tier (CI) for the 10-minute default run: PIG's and EGLP's exact-resume tests keep two
# engines (student and NFNet) in one process in the default run
@pytest.mark.slow
def test_two_engines_in_one_process_do_not_interfere():
    both = run_ranks(_two_engines_and_teacher, 2)
    student_alone = run_ranks(_single_engine_reference, 2, args=("zero2", 0, 1e-2, False))
    nfnet_alone = run_ranks(_single_engine_reference, 2, args=("ddp", 1, 5e-3, True))
    for rank in range(2):
        s, n, t = both[rank]
        for k in s:
            torch.testing.assert_close(s[k], student_alone[rank][k], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(n[k], nfnet_alone[rank][k], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(t[k], both[0][2][k])  # same teacher on both ranks
        assert any((t[k] - s[k]).abs().max() > 0 for k in s), "teacher should lag the student"


def _checkpoint_round_trip(env, kind, tmp):
    from pathlib import Path

    from eglp_dist.runtime.checkpoint import find_latest, load_checkpoint, save_checkpoint
    from eglp_dist.methods.parts.ema import EMATeacher
    from eglp_dist.runtime.engines import export_fp32

    root = Path(tmp) / kind
    eng = _engine(env, kind)
    teacher = EMATeacher(eng.model, alpha=0.5)
    _train(eng, env, 2)
    teacher.update(eng.model, 2)
    save_checkpoint(root, 2, {"student": eng}, {"teacher": teacher}, {"note": "x"}, {"stream": env.rank},
                    keep_last=2)
    torch.manual_seed(123 + env.rank)  # rng state after save, restored on load
    expected_draw = torch.rand(3)
    _train(eng, env, 2, start=2)
    straight = eng.state_dict_fp32()

    fresh = _engine(env, kind, seed=7)  # different init: everything must come from disk
    teacher2 = EMATeacher(fresh.model, alpha=0.5)
    torch.manual_seed(123 + env.rank)
    state, rank_state = load_checkpoint(find_latest(root), {"student": fresh}, {"teacher": teacher2},
                                        restore_rng_state=False)
    assert state["step"] == 2 and state["note"] == "x" and rank_state["stream"] == env.rank
    assert torch.equal(torch.rand(3), expected_draw)
    _train(fresh, env, 2, start=2)
    resumed = fresh.state_dict_fp32()
    exported = export_fp32(root / "iter_0000002" / "engines" / "student")
    return straight, resumed, exported, teacher.state_dict(), teacher2.state_dict()


@pytest.mark.parametrize("kind", ["ddp", "zero2"])
def test_checkpoint_resume_is_exact_and_exports_fp32(kind, tmp_path):
    for straight, resumed, exported, t1, t2 in run_ranks(_checkpoint_round_trip, 2, args=(kind, str(tmp_path))):
        for k in straight:
            assert torch.equal(straight[k], resumed[k]), k
            assert torch.equal(t1[k], t2[k]), k
        assert set(exported) == set(straight)
        assert all(v.dtype == torch.float32 for v in exported.values() if v.is_floating_point())
    ckpts = sorted(p.name for p in (tmp_path / kind).iterdir())
    assert ckpts == ["iter_0000002", "latest"]


def _batch_norm_run(env, kind):
    eng = _engine(env, kind, model=make_tiny(0, batch_norm=True))
    _train(eng, env, 3)  # each rank sees its own batches: running statistics drift apart
    before = {k: v.clone() for k, v in eng.model.state_dict().items() if "running" in k}
    eng.sync_buffers()
    after = {k: v.clone() for k, v in eng.model.state_dict().items() if "running" in k}
    return before, after, eng.state_dict_fp32()


def test_batch_norm_buffers_are_one_model_after_sync_and_equal_under_ddp_and_zero():
    """Ranks' running statistics drift apart during training (neither engine broadcasts
    them: DDP is built without its forward buffer sync); sync_buffers() (before eval/checkpoint) leaves every rank
    with rank 0's, which are the same under DDP and ZeRO-2."""
    ddp = run_ranks(_batch_norm_run, 2, args=("ddp",))
    zero = run_ranks(_batch_norm_run, 2, args=("zero2",))
    for runs in (ddp, zero):
        (before0, after0, _), (before1, after1, _) = runs
        assert any(not torch.equal(before0[k], before1[k]) for k in before0), "ranks should drift before sync"
        for k in after0:
            assert torch.equal(after0[k], after1[k]) and torch.equal(after0[k], before0[k]), k
    for rank in range(2):
        for k, v in ddp[rank][2].items():
            torch.testing.assert_close(v, zero[rank][2][k], rtol=1e-5, atol=1e-6)


def _save_after_two_steps(env, tmp):
    """DDP and ZeRO-2 trained alike for 2 steps and saved (one process start for both)."""
    from pathlib import Path

    from eglp_dist.runtime.checkpoint import save_checkpoint

    out = {}
    for kind in ("ddp", "zero2"):
        eng = _engine(env, kind)
        _train(eng, env, 2)
        save_checkpoint(Path(tmp) / kind, 2, {"student": eng}, {}, {}, {"streams": {}}, keep_last=1)
        out[kind] = eng.full_optimizer_state(), eng.state_dict_fp32()
    return out


def _load_and_continue(env, tmp):
    from pathlib import Path

    from eglp_dist.runtime.checkpoint import find_latest, load_checkpoint

    out = {}
    for kind in ("ddp", "zero2"):
        eng = _engine(env, kind, seed=7)  # other weights: all must come from disk
        load_checkpoint(find_latest(Path(tmp) / kind), {"student": eng}, {}, restore_rng_state=False)
        loaded = eng.full_optimizer_state(), eng.state_dict_fp32(), eng.lrs()
        _train(eng, env, 2, start=2)
        out[kind] = loaded, eng.state_dict_fp32(), eng.full_optimizer_state()
    return out


@pytest.mark.parametrize("world", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_zero2_checkpoint_is_repartitioned_for_another_world_size(tmp_path, world):
    """Saved by 2 ranks, loaded by 1 or 3: the whole optimizer state (Adam's moments) comes
    back bit for bit, re-sliced, and training continues exactly as a DDP run resumed from the
    same state does (a lost or misplaced moment would change the next update)."""
    saved = run_ranks(_save_after_two_steps, 2, args=(str(tmp_path),))[0]
    assert len(list((tmp_path / "zero2" / "iter_0000002" / "engines" / "student" / "zero").glob("*optim_states.pt"))) == 2
    out = run_ranks(_load_and_continue, world, args=(str(tmp_path),))
    moments, weights = saved["zero2"]
    for rank in range(world):
        (loaded_moments, loaded_weights, lrs), after, after_moments = out[rank]["zero2"]
        ddp = out[rank]["ddp"]
        assert set(loaded_moments) == set(moments) and all(set(v) == {"exp_avg", "exp_avg_sq"} for v in moments.values())
        for name in moments:
            for key in moments[name]:
                assert torch.equal(loaded_moments[name][key], moments[name][key]), (name, key)
        for k in weights:
            assert torch.equal(loaded_weights[k], weights[k]), k
        assert lrs == ddp[0][2]
        for k in after:
            torch.testing.assert_close(after[k], ddp[1][k], rtol=1e-5, atol=1e-6, msg=k)
        for name in after_moments:
            for key in after_moments[name]:
                torch.testing.assert_close(after_moments[name][key], ddp[2][name][key], rtol=1e-5, atol=1e-7)


# ------------------------------------------------- DeepSpeed's private ZeRO members, checked at build

def test_the_private_zero_members_are_checked_when_an_engine_is_built(capsys):
    """Elastic resume uses private members of DeepSpeed's ZeRO optimizer: the installed one
    has them, a DeepSpeed without one fails at build time naming it and the version, one
    outside the tested series gets a note."""
    from types import SimpleNamespace

    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from eglp_dist.errors import ConfigError
    from eglp_dist.runtime import zero_internals

    assert all(callable(getattr(DeepSpeedZeroOptimizer, m, None)) for m in zero_internals.METHODS)
    complete = SimpleNamespace(**{m: (lambda *a: None) for m in zero_internals.METHODS},
                               _hp_optimizer_states_linked=True)
    zero_internals.check(complete, "zero2", "0.19.8")
    assert capsys.readouterr().err == ""
    zero_internals.check(complete, "zero2", "0.21.0rc1")
    assert "DeepSpeed 0.21.0rc1 is outside the tested series (0.19)" in capsys.readouterr().err
    renamed = SimpleNamespace(**{m: (lambda *a: None) for m in zero_internals.METHODS[1:]})
    with pytest.raises(ConfigError, match=r"engine.kind=zero1: DeepSpeed 0.22.1's SimpleNamespace lacks "
                                          r"_load_global_state, _hp_optimizer_states_linked"):
        zero_internals.check(renamed, "zero1", "0.22.1")


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
