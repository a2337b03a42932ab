"""The UDA recipe's step: teacher timing, what each part feeds the loss, config checks."""
import torch

from dist_harness import run_ranks
from eglp_dist.config import PACKAGE_CONFIG_ROOT, load_config
from eglp_dist.errors import ConfigError

UDA = PACKAGE_CONFIG_ROOT / "demo" / "tiny_uda.yaml"


def _batch(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    b, (h, w) = cfg.data.source.batch_size, cfg.data.source.crop_size
    return {"source": {"img": torch.randn(b, 3, h, w, generator=g), "seg": torch.randint(0, 19, (b, h, w), generator=g)},
            "target": {"img": torch.randn(b, 3, h, w, generator=g)}}


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _teacher_follows_daformer(env):
    from eglp_dist.methods import build_method

    cfg = load_config(UDA, ["method.mic.enabled=true", "method.fd.enabled=true", "schedule.warmup_iters=0",
                            "data.source.crop_size=[64,64]", "data.target.crop_size=[64,64]"])
    method = build_method(cfg, env, torch.device("cpu"))
    student, teacher = method.student.model, method.teacher.module
    init = _params(student)
    logs = method.step(_batch(cfg, 0), 0)
    assert all(torch.equal(t, p) for t, p in zip(_params(teacher), init)), "step 0 must not move the teacher"
    after0 = _params(student)
    assert any(not torch.equal(a, b) for a, b in zip(after0, init)), "the optimiser stepped"
    method.step(_batch(cfg, 1), 1)  # alpha_1 = min(1 - 1/2, 0.999) = 0.5, before the pseudo-labels
    for t, a, b in zip(_params(teacher), init, after0):
        torch.testing.assert_close(t, 0.5 * a + 0.5 * b)
    assert {"src.loss_seg", "src.loss_seg_hr", "src.loss_imnet_feat_dist", "pseudo.confidence",
            "mix.loss_seg", "masked.loss_seg"} <= set(logs)
    assert all(torch.isfinite(v) for v in logs.values())
    visuals = method.visuals()
    assert visuals["mix_seg"].shape == (1, 64, 64) and visuals["tgt_pseudo"].dtype == torch.long
    return True


def test_uda_step_updates_the_teacher_as_daformer():
    assert run_ranks(_teacher_follows_daformer, 1) == [True]


def _mismatch(env):
    from eglp_dist.methods import build_method

    cfg = load_config(UDA, ["data.target.batch_size=1"])
    try:
        build_method(cfg, env, torch.device("cpu"))
    except ConfigError as exc:
        return str(exc)
    return None


def test_classmix_needs_paired_source_and_target_batches():
    (message,) = run_ranks(_mismatch, 1)
    assert message and "data.source and data.target" in message


def test_every_method_name_the_config_accepts_is_built():
    from eglp_dist.methods import METHODS
    from eglp_dist.methods.config import MethodConfig

    accepted = MethodConfig.__dataclass_fields__["name"].metadata["choices"]
    assert set(accepted) == set(METHODS)


def test_each_recipe_keeps_the_phases_of_the_recipe_it_extends_in_their_order():
    """Phases are bound methods a reader follows by name; a recipe built on another keeps
    every phase of its base, in order (it overrides or adds, never drops), and what its
    phases hand each other is a field of its state type (a dataclass, no free-form dict)."""
    import dataclasses

    from eglp_dist.methods import METHODS, build_method
    from eglp_dist.runtime.env import DistEnv

    names = {}
    for name in METHODS:
        cfg = load_config(PACKAGE_CONFIG_ROOT / "demo" / f"tiny_{name}.yaml")
        m = build_method(cfg, DistEnv(), torch.device("cpu"))
        phases = m.phases()
        assert all(getattr(p, "__self__", None) is m for p in phases), name
        names[name] = [p.__name__ for p in phases]
        assert names[name][-1] == "optimizer_step"
        fields = {f.name for f in dataclasses.fields(m.state_type)}
        assert {"it", "batches", "logs", "visuals"} <= fields and "extra" not in fields
    for child, base in (("spn", "source_only"), ("pig", "uda"), ("eglp", "pig")):
        kept = [p for p in names[child] if p in names[base]]
        assert kept == names[base], (child, names[child])
    assert names["spn"] == names["source_only"]  # SPN overrides one phase, adds none
