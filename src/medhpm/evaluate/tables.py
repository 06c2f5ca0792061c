"""Result tables laid out like the paper's Table 1, and aggregation of runs over seeds.

A *summary* is what ``metrics.summarize`` returns (and metrics.json stores under ``"summary"``):
``{"<label>": {"dice_mean", "hd95_mean", ...}, "mean": {...}}``. ``aggregate_seeds`` turns several summaries
of one method (one per seed) into a summary of the same shape whose ``*_mean``/``*_std`` are over seeds and
which keeps the per-seed values, so a table can show ``mean ± std`` for any subset of organs.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from .classes import display_name

MISSING = "n/a"


def _num(x: object) -> float:
    """JSON null and NaN both mean 'undefined'."""
    return math.nan if x is None else float(x)  # type: ignore[arg-type]


def _label_keys(summary: Mapping[str, Mapping]) -> list[str]:
    return [k for k in summary if k != "mean"]


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1 (NaN under 2 values), count) of the finite ``values``; None is NaN."""
    arr = np.array([_num(v) for v in values], dtype=float)
    arr = arr[np.isfinite(arr)]
    mean = float(arr.mean()) if arr.size else math.nan
    std = float(arr.std(ddof=1)) if arr.size >= 2 else math.nan
    return mean, std, int(arr.size)


def aggregate_seeds(summaries: Sequence[Mapping[str, Mapping]]) -> dict[str, dict]:
    """Mean and sample std (ddof=1) over seeds of per-label and average Dice/HD95.

    Each input is one run's summary (same labels in all). Returns ``{"<label>": {"dice_mean", "dice_std",
    "hd95_mean", "hd95_std", "n_seeds", "dice_seeds", "hd95_seeds"}, "mean": {same keys}}``; NaN where
    undefined (a std needs two seeds).
    """
    if not summaries:
        raise ValueError("aggregate_seeds needs at least one summary.")
    labels = _label_keys(summaries[0])
    for i, s in enumerate(summaries[1:], start=1):
        if set(_label_keys(s)) != set(labels):
            raise ValueError(
                f"summary {i} has labels {sorted(_label_keys(s), key=int)} but summary 0 has "
                f"{sorted(labels, key=int)}; seeds of one method must be evaluated on the same classes."
            )
    out: dict[str, dict] = {}
    for key in [*labels, "mean"]:
        dice_seeds = [_num(s[key].get("dice_mean")) for s in summaries]
        hd_seeds = [_num(s[key].get("hd95_mean")) for s in summaries]
        dice_mean, dice_std, n_seeds = mean_std(dice_seeds)
        hd_mean, hd_std, _ = mean_std(hd_seeds)
        out[key] = {
            "dice_mean": dice_mean,
            "dice_std": dice_std,
            "hd95_mean": hd_mean,
            "hd95_std": hd_std,
            "n_seeds": n_seeds,
            "dice_seeds": dice_seeds,
            "hd95_seeds": hd_seeds,
        }
    return out


def _average(summary: Mapping[str, Mapping], labels: list[str]) -> tuple[float, float, float, float, bool]:
    """Average over ``labels`` of the per-label means: (dice, dice_std, hd95, hd95_std, over_seeds).

    For a seed-aggregated summary the average is taken within each seed first, then mean ± std over seeds,
    so the std is that of the average itself, not of the organs.
    """
    entries = [summary[k] for k in labels]
    if all("dice_seeds" in e for e in entries):
        n = len(entries[0]["dice_seeds"])
        per_seed_dice = [mean_std([e["dice_seeds"][i] for e in entries])[0] for i in range(n)]
        per_seed_hd = [mean_std([e["hd95_seeds"][i] for e in entries])[0] for i in range(n)]
        d, ds, nd = mean_std(per_seed_dice)
        h, hs, _ = mean_std(per_seed_hd)
        return d, ds, h, hs, nd > 1
    d, _, _ = mean_std([e.get("dice_mean") for e in entries])
    h, _, _ = mean_std([e.get("hd95_mean") for e in entries])
    return d, math.nan, h, math.nan, False


def _fmt(value: float, std: float, show_std: bool, scale: float = 1.0) -> str:
    if not math.isfinite(value):
        return MISSING
    text = f"{value * scale:.2f}"
    if show_std and math.isfinite(std):
        text += f" ± {std * scale:.2f}"
    return text


def paper_table(
    rows: Mapping[str, Mapping[str, Mapping]], classes: Mapping[int, str], surface_tolerance_mm: float | None = None
) -> str:
    """A Markdown table like the paper's Table 1.

    Args:
        rows: ``{method_name: summary}``; a summary from ``metrics.summarize`` (one run) or from
            ``aggregate_seeds`` (then cells read ``mean ± std`` over seeds). Every label of ``classes``
            must be in each summary; the summary may hold more labels (e.g. 13 evaluated, 8 shown).
        classes: ``{label_value: name}``: the organ columns, in this order.
    Returns:
        ``| Method | Avg DSC / HD95 | <organ> ... |`` with one line per method: DSC in percent and HD95 in mm,
        2 decimals; "Avg" is the unweighted mean over the shown organs of the per-organ means
        (undefined values print as ``n/a``). When every summary holds surface metrics (one run of
        ``medhpm evaluate``), an extra column set follows the paper's columns, which stay as they are:
        ``Avg NSD@<t> mm / ASSD`` and one ``<organ> NSD`` column per organ (NSD in percent, ASSD in mm).
    """
    if not classes:
        raise ValueError("paper_table needs at least one class to show.")
    labels = [str(int(v)) for v in classes]
    header = ["Method", "Avg DSC / HD95", *(display_name(classes[v]) for v in classes)]
    surface = surface_tolerance_mm is not None and all(
        "surface_dice_mean" in s.get(k, {}) for s in rows.values() for k in labels
    )
    if surface:
        header += [f"Avg NSD@{surface_tolerance_mm:g} mm / ASSD", *(f"{display_name(classes[v])} NSD" for v in classes)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for method, summary in rows.items():
        missing = [k for k in labels if k not in summary]
        if missing:
            raise ValueError(
                f"summary of method {method!r} has no result for label(s) {', '.join(missing)}; "
                f"it holds {', '.join(_label_keys(summary))}."
            )
        d, ds, h, hs, over_seeds = _average(summary, labels)
        cells = [str(method), f"{_fmt(d, ds, over_seeds, 100)} / {_fmt(h, hs, over_seeds)}"]
        for k in labels:
            e = summary[k]
            show_std = int(e.get("n_seeds", 0) or 0) > 1
            cells.append(_fmt(_num(e.get("dice_mean")), _num(e.get("dice_std")), show_std, 100))
        if surface:
            nsd, _, _ = mean_std([summary[k].get("surface_dice_mean") for k in labels])
            assd, _, _ = mean_std([summary[k].get("assd_mean") for k in labels])
            cells.append(f"{_fmt(nsd, math.nan, False, 100)} / {_fmt(assd, math.nan, False)}")
            cells += [_fmt(_num(summary[k].get("surface_dice_mean")), math.nan, False, 100) for k in labels]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
