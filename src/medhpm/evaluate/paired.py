"""Paired comparisons of two methods over seeds: the difference a reader can trust.

Runs of two methods with the same seed share their data draws (the validation split, the labelled cases,
the crops), so the seed's luck cancels in their difference. For methods A and B with results ``a_s`` and
``b_s`` over the seeds ``s`` both have, ``d_s = a_s - b_s``:

* ``mean`` and ``std`` (sample standard deviation, ``ddof = 1``) of ``d_s``, ``n`` seeds;
* a two-sided Student-t interval at ``confidence`` (95 % by default):
  ``mean -/+ t_{(1 + confidence) / 2, n - 1} * std / sqrt(n)``; it needs at least 2 seeds (``lo``/``hi`` are
  NaN with one), and it assumes the differences are roughly normal, which with 3 to 5 seeds nobody can
  check: read it as the width the seeds allow, not as a test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from scipy import stats

from medhpm.evaluate.tables import mean_std

__all__ = ["paired_difference"]


def paired_difference(a: Mapping, b: Mapping, confidence: float = 0.95) -> dict:
    """``a``, ``b``: ``{seed: value}`` of two methods; only the seeds both have are paired (NaN values
    are left out). Returns ``{"mean", "std", "n", "lo", "hi", "confidence", "interval", "seeds"}``."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    seeds = sorted(s for s in set(a) & set(b) if math.isfinite(float(a[s])) and math.isfinite(float(b[s])))
    d = [float(a[s]) - float(b[s]) for s in seeds]
    n = len(d)
    out = {
        "n": n,
        "seeds": seeds,
        "confidence": confidence,
        "interval": "Student t, paired over seeds",
        "mean": float("nan"),
        "std": float("nan"),
        "lo": float("nan"),
        "hi": float("nan"),
    }
    if n == 0:
        return out
    mean, std, _ = mean_std(d)  # the seeds' mean and sample std, as the tables compute them
    out["mean"] = mean
    if n < 2:
        return out
    half = float(stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) * std / math.sqrt(n)
    out.update(std=std, lo=mean - half, hi=mean + half)
    return out
