"""EMA teacher: schedule, arithmetic over parameters and buffers, no gradients, wrappers."""

import pytest
import torch
from torch import nn

from medhpm.pretrain import EMATeacher, ema_update, momentum_at


def test_momentum_schedule_is_a_share_of_the_run():
    # HPM's ImageNet schedule in these terms: a 1M-step run, horizons 1,000 -> 10,000 steps over half of it
    assert momentum_at(1, 1_000_000) == pytest.approx(0.999, abs=1e-8)
    assert momentum_at(250_000, 1_000_000) == pytest.approx(0.99945, abs=1e-8)
    assert momentum_at(500_000, 1_000_000) == pytest.approx(0.9999, abs=1e-9)
    assert momentum_at(900_000, 1_000_000) == pytest.approx(0.9999, abs=1e-9)
    # the same shares of a 240-step run: horizons of 0.24 (-> one step, m = 0) and 2.4 steps
    assert momentum_at(1, 240) == pytest.approx(0.0 + (1 / 120) * (1 - 1 / 2.4))
    assert momentum_at(120, 240) == pytest.approx(1 - 1 / 2.4)
    # hand-computed: T = 1000, horizons 10 and 100 steps (m 0.9 and 0.99), ramp over the first 200 steps
    assert momentum_at(50, 1000, 0.01, 0.1, 0.2) == pytest.approx(0.9 + 0.25 * 0.09)
    assert momentum_at(7, 1000, 0.01, 0.1, 0.0) == pytest.approx(0.99)
    for bad in (dict(horizon_start=0.0), dict(horizon_end=1.5), dict(ramp=-0.1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            momentum_at(1, 100, **bad)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.register_buffer("scale", torch.ones(4))
        self.register_buffer("counter", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        return self.bn(self.lin(x)) * self.scale


def perturbed_student(teacher_src):
    student = Net()
    student.load_state_dict(teacher_src.state_dict())
    student.train()
    student(torch.randn(16, 3))  # moves BatchNorm running stats and num_batches_tracked
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student.scale.mul_(3.0)
        student.counter.fill_(7)
    return student


def test_ema_arithmetic_includes_buffers():
    torch.manual_seed(0)
    student0 = Net()
    teacher = EMATeacher(student0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = perturbed_student(student0)
    m = 0.9
    teacher.update(student, m)
    after = teacher.state_dict()
    for k, s in student.state_dict().items():
        if s.dtype.is_floating_point:
            torch.testing.assert_close(after[k], m * before[k] + (1 - m) * s, msg=k)
        else:
            assert torch.equal(after[k], s), k
    assert after["bn.num_batches_tracked"].item() == 1 and after["counter"].item() == 7
    teacher.update(student, 1.0)  # momentum 1 keeps the teacher
    torch.testing.assert_close(teacher.state_dict()["lin.weight"], after["lin.weight"])
    teacher.update(student, 0.0)  # momentum 0 copies the student
    torch.testing.assert_close(teacher.state_dict()["lin.weight"], student.lin.weight.detach())


def test_teacher_is_frozen_and_in_eval():
    torch.manual_seed(1)
    student = Net()
    teacher = EMATeacher(student)
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    student.train()
    loss = student(torch.randn(8, 3)).sum() + teacher(torch.randn(8, 3)).sum()
    loss.backward()
    assert all(p.grad is None for p in teacher.model.parameters())
    teacher.model.train()
    teacher.update(student, 0.5)
    assert not teacher.model.training
    # the copy is independent of the student
    with torch.no_grad():
        student.lin.weight.add_(1.0)
    assert not torch.equal(teacher.model.lin.weight, student.lin.weight)


def test_wrapped_student_and_state_dict_round_trip():
    torch.manual_seed(2)
    student = Net()
    teacher = EMATeacher(nn.DataParallel(student))  # same unwrapping path as DDP (.module)
    assert set(teacher.state_dict()) == set(student.state_dict())

    class Compiled(nn.Module):  # stands in for torch.compile's OptimizedModule
        def __init__(self, mod):
            super().__init__()
            self._orig_mod = mod

    other = perturbed_student(student)
    expected = 0.5 * teacher.model.lin.weight + 0.5 * other.lin.weight.detach()
    teacher.update(Compiled(nn.DataParallel(other)), 0.5)
    torch.testing.assert_close(teacher.model.lin.weight, expected)

    fresh = EMATeacher(Net())
    fresh.load_state_dict(teacher.state_dict())
    torch.testing.assert_close(fresh.model.lin.weight, teacher.model.lin.weight)
    assert not fresh.model.training and not fresh.model.lin.weight.requires_grad


def test_mismatched_models_raise():
    teacher = EMATeacher(Net())
    with pytest.raises(ValueError, match="differ"):
        ema_update(teacher.model, nn.Linear(3, 4), 0.9)
    with pytest.raises(ValueError, match="momentum"):
        teacher.update(Net(), 1.5)
