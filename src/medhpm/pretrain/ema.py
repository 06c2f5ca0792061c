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


def momentum_at(
    step: int, total_steps: int, horizon_start: float = 0.001, horizon_end: float = 0.01, ramp: float = 0.5
) -> float:
    """EMA momentum for the update after optimizer step ``step`` (1-based) of a run of ``total_steps``.

    The schedule is set by the teacher's averaging horizon ``H = 1 / (1 - m)`` (the number of recent
    student steps it averages over), given as a SHARE of the run so that it adapts to the data set size,
    the batch and the steps per epoch:

    * ``H_start = max(1, horizon_start * total_steps)``, ``H_end = max(1, horizon_end * total_steps)``;
      ``m_start = 1 - 1 / H_start``, ``m_end = 1 - 1 / H_end`` (a horizon of one step or less is m = 0: the
      teacher is the student's copy);
    * ``m`` rises linearly from ``m_start`` to ``m_end`` over the first ``ramp`` of the run, then stays.

    The defaults are HPM's ImageNet schedule expressed this way: 0.999 -> 0.9999 over the first 100 of 200
    epochs of about 5,000 steps (1,000 -> 10,000-step horizons of a 1M-step run). docs/method.md gives the
    reason and the momenta this yields for each packaged config.

    Args:
        step: optimizer steps done, counting the one just made (>= 1).
        total_steps: optimizer steps of the whole run (>= 1).
        horizon_start, horizon_end: horizons as shares of the run, in (0, 1].
        ramp: share of the run over which the momentum ramps, in [0, 1]; 0 means ``m_end`` from the start.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}.")
    for name, value in (("horizon_start", horizon_start), ("horizon_end", horizon_end)):
        if not 0.0 < float(value) <= 1.0:
            raise ValueError(f"{name} must be in (0, 1] (a share of the run), got {value}.")
    if not 0.0 <= float(ramp) <= 1.0:
        raise ValueError(f"ramp must be in [0, 1] (a share of the run), got {ramp}.")
    m_start = 1.0 - 1.0 / max(1.0, float(horizon_start) * total_steps)
    m_end = 1.0 - 1.0 / max(1.0, float(horizon_end) * total_steps)
    ramp_steps = float(ramp) * total_steps
    progress = 1.0 if ramp_steps <= 0 else min(max(float(step) / ramp_steps, 0.0), 1.0)
    return m_start + progress * (m_end - m_start)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float, applied: torch.Tensor | None = None) -> None:
    """In place: ``t = m * t + (1 - m) * s`` for every parameter and floating buffer; other buffers copied.

    ``applied``: optional 0-dim bool tensor on the teacher's device; where it is false the teacher is left
    as it is (the trainer's optimizer step was skipped on a non-finite loss), decided on the device
    without reading the flag back.

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
        elif applied is None:
            t.copy_(s)
        else:
            t.copy_(torch.where(applied, s, t))
    if t_float:
        # t + (1 - m) * (s - t) == m * t + (1 - m) * s, in one fused pass over all tensors
        weight = 1.0 - float(momentum)
        if applied is None:
            torch._foreach_lerp_(t_float, s_float, weight)
        else:  # weight 0 where the step was skipped
            # a tensor weight: torch takes it, its stubs list scalars and tensor lists only
            torch._foreach_lerp_(t_float, s_float, applied.to(t_float[0].dtype) * weight)  # type: ignore[call-overload]


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
    def update(self, student: nn.Module, momentum: float, applied: torch.Tensor | None = None) -> None:
        """EMA step, after (never before) the optimizer step: ``t = m t + (1 - m) s`` (left out where the
        0-dim bool tensor ``applied`` is false, see :func:`ema_update`)."""
        ema_update(self.model, student, momentum, applied)
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
