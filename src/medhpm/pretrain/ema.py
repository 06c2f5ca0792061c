"""The EMA teacher of HPM: a frozen copy of the whole student, updated after every optimizer step.

``teacher = m * teacher + (1 - m) * student`` over all parameters and floating buffers (non-floating
buffers, e.g. BatchNorm's ``num_batches_tracked``, are copied). The teacher starts as a copy of the
randomly initialised student, stays in eval mode and never takes gradients.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from medhpm.runtime.distributed import unwrap

__all__ = ["momentum_at", "ema_update", "EMATeacher"]


def momentum_at(epoch: float, m_start: float = 0.999, m_end: float = 0.9999, ramp_epochs: float = 100.0) -> float:
    """EMA momentum schedule: linear from ``m_start`` at epoch 0 to ``m_end`` at ``ramp_epochs``, then
    constant (HPM: 0.999 -> 0.9999 over the first 100 epochs).

    Args:
        epoch: training progress in epochs, may be fractional (``step / steps_per_epoch``) so the
            momentum moves every step.
        m_start, m_end: momenta in [0, 1].
        ramp_epochs: length of the ramp; ``<= 0`` means ``m_end`` from the start.
    """
    for name, value in (("m_start", m_start), ("m_end", m_end)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}.")
    if ramp_epochs <= 0:
        return float(m_end)
    progress = min(max(float(epoch) / float(ramp_epochs), 0.0), 1.0)
    return float(m_start) + progress * (float(m_end) - float(m_start))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: ``t = m * t + (1 - m) * s`` for every parameter and floating buffer; other buffers copied.

    ``teacher`` and ``student`` must have the same architecture (names are checked); ``student`` may be
    wrapped (DDP, ``torch.compile``).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}.")
    student = unwrap(student)
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    # the teacher may lack parts it never runs (HPM's teacher needs no reconstructor); every part it
    # has must exist in the student
    if not t_params.keys() <= s_params.keys() or not t_params:
        missing = sorted(set(t_params) - set(s_params))[:5] or sorted(s_params)[:5]
        raise ValueError(f"teacher and student parameters differ (e.g. {missing}); they must share one architecture.")
    t_bufs = dict(teacher.named_buffers())
    s_bufs = dict(student.named_buffers())
    if not t_bufs.keys() <= s_bufs.keys():
        missing = sorted(set(t_bufs) - set(s_bufs))[:5]
        raise ValueError(f"teacher and student buffers differ (e.g. {missing}); they must share one architecture.")

    t_float, s_float = [], []
    for name, t in list(t_params.items()) + list(t_bufs.items()):
        s = s_params[name] if name in s_params else s_bufs[name]
        if t.dtype.is_floating_point:
            t_float.append(t.data if isinstance(t, nn.Parameter) else t)
            s_float.append(s.detach().to(t.dtype))
        else:
            t.copy_(s)
    if t_float:
        # t + (1 - m) * (s - t) == m * t + (1 - m) * s, in one fused pass over all tensors
        torch._foreach_lerp_(t_float, s_float, 1.0 - float(momentum))


class EMATeacher:
    """Holds the teacher: a deep copy of the student, in eval mode, without gradients.

    Not an ``nn.Module`` on purpose: it must not be registered inside the student (its parameters would
    reach the optimizer and ``.train()`` would flip it out of eval mode). Call the model through
    ``teacher.model`` (e.g. ``teacher.model.predict_difficulty(x)`` under ``torch.no_grad()``).
    """

    def __init__(self, student: nn.Module, drop: tuple[str, ...] = ()) -> None:
        """``drop``: names of child modules the teacher never runs (set to None in the copy, not
        EMA-updated): HPM's teacher only predicts difficulty, so its reconstructor can go."""
        self.model = copy.deepcopy(unwrap(student))
        for name in drop:
            if getattr(self.model, name, None) is None:
                raise ValueError(f"cannot drop {name!r}: the student has no such module")
            setattr(self.model, name, None)
        self.model.eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """EMA step, after (never before) the optimizer step: ``t = m t + (1 - m) s``."""
        ema_update(self.model, student, momentum)
        self.model.eval()  # stays in eval mode whatever happened to it meanwhile

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def to(self, *args: Any, **kwargs: Any) -> EMATeacher:
        self.model.to(*args, **kwargs)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> Any:
        result = self.model.load_state_dict(state_dict, strict=strict)
        self.model.eval()
        self.model.requires_grad_(False)
        return result
