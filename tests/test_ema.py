import pytest
import torch

from eglp_dist.methods.parts.ema import EMATeacher, ema_alpha
from tiny_models import make_tiny
from dist_harness import run_ranks


@pytest.mark.parametrize("step,expected", [(0, 0.0), (1, 0.5), (9, 0.9), (999, 0.999), (10**6, 0.999)])
def test_alpha_schedule_is_daformers(step, expected):
    assert ema_alpha(step, 0.999) == pytest.approx(expected)


def test_update_is_the_ema_formula_on_parameters_only():
    """Parameters move by DAFormer's EMA; buffers (batch-norm statistics) keep the values they
    were copied with, however the student's change."""
    student = make_tiny(0, batch_norm=True)
    teacher = EMATeacher(student, alpha=0.999)
    assert not any(p.requires_grad for p in teacher.module.parameters())
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    buffers = [name for name, _ in teacher.module.named_buffers()]
    assert any("running_mean" in name for name in buffers)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        for b in student.buffers():
            b.add_(1)
    alpha = teacher.update(student, step=3)
    assert alpha == pytest.approx(0.75)
    s = dict(student.named_parameters())
    for name, p in teacher.module.named_parameters():
        torch.testing.assert_close(p, alpha * before[name] + (1 - alpha) * s[name])
    for name, b in teacher.module.named_buffers():
        assert torch.equal(b, before[name]), name


def test_step_zero_copies_the_student():
    student, other = make_tiny(0), make_tiny(1)
    teacher = EMATeacher(other)
    teacher.update(student, step=0)
    for (_, a), (_, b) in zip(teacher.module.named_parameters(), student.named_parameters()):
        assert torch.equal(a, b)


def test_teacher_mode_switches_off_dropout_and_drop_path_only():
    from timm.layers import DropPath

    student = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5),
                                  DropPath(0.5))
    teacher = EMATeacher(student)
    teacher.module.eval()  # whatever happened in between
    conv, bn, drop, drop_path = teacher.pseudo_label_mode()
    assert bn.training and not drop.training and not drop_path.training
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(teacher.module(x), teacher.module(x))  # no stochastic layer active


def _teacher_bn(env):
    from eglp_dist.methods.parts.ema import EMATeacher

    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    teacher = EMATeacher(student)
    g = torch.Generator().manual_seed(env.rank)  # each rank its own target batch
    with torch.no_grad():
        teacher.pseudo_label_mode()(torch.randn(2, 3, 8, 8, generator=g) * (env.rank + 1))
    before = teacher.module[1].running_var.clone()
    teacher.sync_buffers()
    return before, teacher.module[1].running_var.clone()


def test_ema_teacher_batch_norm_statistics_are_one_model_after_sync():
    """The teacher's BN runs in training mode (DAFormer), so its running statistics drift
    per rank; synced where the students' are, the checkpoint's teacher is every rank's."""
    (b0, a0), (b1, a1) = run_ranks(_teacher_bn, 2)
    assert not torch.equal(b0, b1)  # drifted apart
    assert torch.equal(a0, b0) and torch.equal(a1, b0)  # rank 0's everywhere
