import pytest
import torch

from eglp_dist.dist.ema import EMATeacher, ema_alpha
from tiny_models import make_tiny


@pytest.mark.parametrize("step,expected", [(0, 0.0), (1, 0.5), (9, 0.9), (999, 0.999), (10**6, 0.999)])
def test_alpha_schedule_is_daformers(step, expected):
    assert ema_alpha(step, 0.999) == pytest.approx(expected)


def test_update_is_the_ema_formula_on_parameters_only():
    student = make_tiny(0)
    teacher = EMATeacher(student, alpha=0.999)
    assert not teacher.module.training and not any(p.requires_grad for p in teacher.module.parameters())
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    alpha = teacher.update(student, step=3)
    assert alpha == pytest.approx(0.75)
    s = dict(student.named_parameters())
    for name, p in teacher.module.named_parameters():
        torch.testing.assert_close(p, alpha * before[name] + (1 - alpha) * s[name])


def test_step_zero_copies_the_student():
    student, other = make_tiny(0), make_tiny(1)
    teacher = EMATeacher(other)
    teacher.update(student, step=0)
    for (_, a), (_, b) in zip(teacher.module.named_parameters(), student.named_parameters()):
        assert torch.equal(a, b)
