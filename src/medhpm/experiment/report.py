"""The results of an experiment, from the finished runs' files: ``results.md`` and ``results.json`` (the
paper's tables per grid value, paired differences with their intervals, the frozen-encoder probes or the
probe curve against pre-training steps, the budget and wall time of every stage), and the figures.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from medhpm.config import METHODS
from medhpm.evaluate.classes import parse_classes
from medhpm.evaluate.paired import paired_difference
from medhpm.evaluate.tables import aggregate_seeds, mean_std, paper_table
from medhpm.experiment.budget import _budget, _budget_md
from medhpm.experiment.spec import (
    CONFIDENCE,
    ENCODER_KEYS,
    INTERVAL,
    LABELLED,
    base_method,
    method_label,
    pairs_of,
    pretrained_as,
    shares_pretraining,
    value_name,
)
from medhpm.runtime.files import atomic_write_text
from medhpm.runtime.logging import read_metrics
from medhpm.viz.report import curve_figure, grid_figure


PROBES = ("linear_cv", "knn", "linear_fixed")  # the probes of the curve, as run_noise_floor names them


def probe_scores(res: dict) -> dict:
    return {
        "linear_fixed": res["balanced_accuracy"],
        "linear_cv": res["linear_cv"]["balanced_accuracy"],
        "knn": res["knn"]["balanced_accuracy"],
    }


def loss_curve(pt: Path) -> list[list[float]]:
    """``[[optimizer step, mean training reconstruction loss of the epoch ending there], ...]`` of a
    pre-training (its ``metrics.jsonl`` epoch records)."""
    epochs = {
        r["epoch"]: r
        for r in read_metrics(pt / "metrics.jsonl")  # a resumed epoch: its last record
        if r.get("kind") == "epoch" and "loss_rec" in r and "epoch" in r
    }
    out, step = [], 0
    for e in sorted(epochs):
        step += int(epochs[e].get("steps") or 0)
        out.append([step, float(epochs[e]["loss_rec"])])
    return out


def _pretrain_cost(pt: Path) -> dict | None:
    recs = read_metrics(pt / "metrics.jsonl")
    steps = [
        r["compute_time"] + r.get("data_time", 0.0) for r in recs if r.get("kind") == "step" and "compute_time" in r
    ]
    epochs = [r["epoch_time"] for r in recs if r.get("kind") == "epoch" and "epoch_time" in r]
    if not steps:
        return None
    summ = json.loads((pt / "summary.json").read_text()) if (pt / "summary.json").exists() else {}
    return {
        "step_s": statistics.median(steps[1:] or steps),
        "compute_step_s": statistics.median([r["compute_time"] for r in recs if r.get("kind") == "step"][1:] or steps),
        "epoch_s": statistics.median(epochs) if epochs else None,
        "peak_memory_mib": summ.get("peak_memory_mib"),
        "peak_memory_kind": summ.get("peak_memory_kind"),
    }


def _paired(per_seed: dict[str, dict], methods: list[str], pairs) -> dict:
    """``{"A-B": paired_difference(...)}`` for the ``pairs`` (:func:`pairs_of`) among ``methods``;
    ``per_seed`` maps a method to ``{seed: value}``."""
    return {
        f"{a}-{b}": paired_difference(per_seed[a], per_seed[b], CONFIDENCE)
        for a, b in pairs
        if a in methods and b in methods
    }


def _ms(values) -> dict:
    mean, std, n = mean_std(list(values))
    return {"mean": mean, "std": std, "n": n}


def write_experiment_results(
    out: Path, spec: dict, cfg, runs: list[dict], probes: list[dict] | None = None, curve: dict | None = None
) -> Path:
    """``results.md`` and ``results.json`` of the finished ``runs`` (:func:`planned_runs`, less their
    configs), with the per-(method, seed) ``probes`` or, with ``pretrain_seeds``, the probe ``curve``
    (:func:`_run_probe_curve`)."""
    classes = parse_classes(cfg.finetune.reported)
    probes = probes or []
    methods = [m for m in spec["methods"]]
    cell_names = list(dict.fromkeys(r["cell"] for r in runs))
    per_cell: dict = {c: {} for c in cell_names}  # cell -> method -> [summary]
    seeds_of: dict = {c: {} for c in cell_names}  # cell -> method -> [seed]
    costs: dict[str, list] = {}
    seen_pt = set()
    for r in runs:
        m = json.loads((r["dir"] / "evaluation" / "metrics.json").read_text())
        per_cell[r["cell"]].setdefault(r["method"], []).append(m["summary"])
        seeds_of[r["cell"]].setdefault(r["method"], []).append(r["seed"])
        pt = r.get("pretrain_dir") or r["dir"] / "pretrain"
        if pt not in seen_pt:
            seen_pt.add(pt)
            c = _pretrain_cost(pt)
            if c:
                costs.setdefault(r["method"], []).append(c)
    grid = spec.get("grid")
    values = {r["cell"]: r["value"] for r in runs}
    cells_out = []
    for c in cell_names:
        dice = {
            m: {s: sm["mean"].get("dice_mean") for s, sm in zip(seeds_of[c][m], per_cell[c][m])} for m in per_cell[c]
        }
        hd = {m: {s: sm["mean"].get("hd95_mean") for s, sm in zip(seeds_of[c][m], per_cell[c][m])} for m in per_cell[c]}
        dice = {m: {s: math.nan if v is None else float(v) for s, v in d.items()} for m, d in dice.items()}
        hd = {m: {s: math.nan if v is None else float(v) for s, v in d.items()} for m, d in hd.items()}
        cells_out.append(
            {
                "name": c,
                "value": values[c],
                "methods": {
                    m: {
                        "dice": {**_ms(dice[m].values()), "seeds": dice[m]},
                        "hd95": {**_ms(hd[m].values()), "seeds": hd[m]},
                    }
                    for m in per_cell[c]
                },
                "paired": {
                    "dice": _paired(dice, list(per_cell[c]), pairs_of(spec)),
                    "hd95": _paired(hd, list(per_cell[c]), pairs_of(spec)),
                },
                "aggregate": {m: aggregate_seeds(s) for m, s in per_cell[c].items()},
            }
        )
    probe_out = _probe_summary(spec, probes, out)
    figure = None
    if grid:
        series = {
            method_label(spec, m): [
                (cell["value"], 100 * cell["methods"][m]["dice"]["mean"], 100 * cell["methods"][m]["dice"]["std"])
                for cell in cells_out
                if m in cell["methods"]
            ]
            for m in methods
        }
        figure = grid_figure(
            series,
            out / f"dice_vs_{value_name(grid['key'])}.png",
            xlabel=grid["key"],
            title=f"{spec['name']}: mean ± std over seeds {spec['seeds']}",
        )
    budget = _budget(spec, runs, probes)
    curve_md = ""
    if curve:
        budget["probe_seconds"] += curve["seconds"]
        probe_out = _curve_as_probe(spec, curve)
        curve_md = _curve_md(
            spec,
            curve,
            curve_figure(
                {method_label(spec, m): e for m, e in curve["methods"].items()},
                curve["floor"],
                out / "probe_vs_pretraining_steps.png",
                PROBES[:2],
                title=f"{spec['name']}: frozen-encoder probes on {curve['test_cases']} test cases",
            ),
        )
    md = (
        _results_md(spec, cfg, classes, cells_out, probe_out, costs, figure, out, curve_md)
        + f"\n## Budget and wall time\n\n{_budget_md(spec, budget)}"
    )
    atomic_write_text(out / "results.md", md)
    payload = {
        "spec": spec,
        "interval": INTERVAL,
        "confidence": CONFIDENCE,
        "grid": grid,
        "cells": cells_out,
        "probe": probe_out,
        "probe_curve": curve,
        "pretrain_cost": costs,
        "budget": budget,
        "figure": figure.name if figure else None,
    }
    if not grid:  # the layout of experiments without a grid, as before
        payload["methods"] = cells_out[0]["aggregate"]
        payload["per_seed"] = per_cell[None]
    atomic_write_text(out / "results.json", json.dumps(_finite(payload), indent=2, default=_json_default))
    print("\n" + md)
    return out / "results.md"


def _probe_summary(spec: dict, probes: list[dict], out: Path) -> dict | None:
    if not probes:
        return None
    summary: dict = {"metric": probes[0]["result"]["metric"], "cells": {}}
    for p in probes:
        cell = summary["cells"].setdefault(
            p["cell"] or "all", {"methods": {}, "labelled_cases": p["result"]["labelled_cases"]}
        )
        e = cell["methods"].setdefault(p["method"], {"seeds": {}, "chance": {}, "files": {}})
        e["seeds"][p["seed"]] = p["result"]["balanced_accuracy"]
        e["chance"][p["seed"]] = p["result"]["chance"]
        e["files"][p["seed"]] = str(p["path"].relative_to(out))
    for cell in summary["cells"].values():
        for e in cell["methods"].values():
            e.update(_ms(e["seeds"].values()))
        cell["paired"] = _paired(
            {m: e["seeds"] for m, e in cell["methods"].items()}, list(cell["methods"]), pairs_of(spec)
        )
    return summary


def _curve_as_probe(spec: dict, curve: dict) -> dict:
    """The cross-validated linear probe of the encoder each method fine-tunes from (its pre-training's end or
    its ``M@STEP`` snapshot, mean over pre-training seeds; ``scratch``: the noise floor over the label
    draws' random initialisations), in the shape the Dice table reads (``cells.all.methods``)."""
    methods = {}
    for m in spec["methods"]:
        base, src = base_method(spec, m), pretrained_as(spec, m)
        if base in METHODS and src in curve["methods"]:
            step = spec["variants"].get(m, {}).get("from_step")
            vals = [
                e["linear_cv"][e["steps"].index(step) if step else -1]
                for e in curve["methods"][src].values()
                if e["steps"] and (not step or step in e["steps"])
            ]
            if vals:
                methods[m] = _ms(vals)
        elif base == "scratch":
            f = curve["floor"]["linear_cv"]
            methods[m] = {"mean": f["mean"], "std": f["std"], "n": f["n"]}
    return {
        "metric": "balanced accuracy of the cross-validated linear probe (all training cases)",
        "cells": {"all": {"methods": methods}},
        "from_curve": True,
    }


def _curve_md(spec: dict, curve: dict, figure: Path) -> str:
    names = {
        "linear_cv": "cross-validated linear probe",
        "knn": "kNN probe",
        "linear_fixed": "fixed linear probe (L2 1e-3)",
    }
    floor = curve["floor"]
    parts = [
        "## Frozen-encoder probes against pre-training steps\n\n"
        f"Every snapshot of every pre-training, frozen, probed on the tokens of all {curve['training_cases']} "
        f"training cases and scored on the {curve['test_cases']} test cases by balanced accuracy (%), with the "
        "same case-wise folds for every encoder (the probes: docs/experiments.md). **Noise floor**: the same "
        f"probes of the random initialisations fine-tuning from scratch starts from ({floor['linear_cv']['n']} "
        f"of them, `{curve['floor_file']}`): mean ± std [min, max]. An encoder above the floor's max holds "
        "something random initialisations do not.\n",
        f"![probes against pre-training steps]({figure.name})\n\n[{figure.name}]({figure.name}): the "
        "cross-validated linear and the kNN probe against the pre-training's optimizer steps (log scale) per "
        "method, the noise floor as a band (mean ± std, dotted: its max); right: the training reconstruction "
        "loss of each epoch.\n",
    ]
    for k in PROBES:
        f = floor[k]
        steps = sorted({s_ for m in curve["methods"].values() for e in m.values() for s_ in e["steps"]})
        lines = [
            "| method (pre-training seed) | " + " | ".join(f"step {s_}" for s_ in steps) + " |",
            "|---|" + "---|" * len(steps),
        ]
        lines.append(
            "| random initialisation (noise floor) | "
            + " | ".join(
                [
                    f"{100 * f['mean']:.1f} ± {100 * (f['std'] if math.isfinite(f['std']) else 0):.1f} "
                    f"[{100 * f['min']:.1f}, {100 * f['max']:.1f}]"
                ]
                * len(steps)
            )
            + " |"
        )
        for m, seeds in curve["methods"].items():
            for p, e in seeds.items():
                at = dict(zip(e["steps"], e[k]))
                lines.append(
                    f"| {method_label(spec, m)} ({p}) | "
                    + " | ".join(
                        f"{100 * at[s_]:.1f}" + ("*" if at[s_] > f["max"] else "") if s_ in at else "-" for s_ in steps
                    )
                    + " |"
                )
        parts.append(f"### {names[k]}\n\n" + "\n".join(lines) + "\n\n`*`: above the noise floor's max.\n")
    held = [
        (m, p, e)
        for m, seeds in curve["methods"].items()
        for p, e in seeds.items()
        if any(v is not None for v in e.get("heldout_loss") or [])
    ]
    if held:
        steps = sorted({s_ for _, _, e in held for s_ in e["steps"]})
        lines = [
            "| method (pre-training seed) | " + " | ".join(f"step {s_}" for s_ in steps) + " |",
            "|---|" + "---|" * len(steps),
        ]
        for m, p, e in held:
            at = dict(zip(e["steps"], e["heldout_loss"]))
            train = {s_: lo for s_, lo in e.get("loss_rec") or []}
            lines.append(
                f"| {method_label(spec, m)} ({p}) | "
                + " | ".join(
                    (f"{at[s_]:.3f}" + (f" ({train[s_]:.3f})" if s_ in train else ""))
                    if at.get(s_) is not None
                    else "-"
                    for s_ in steps
                )
                + " |"
            )
        parts.append(
            "### Reconstruction loss on the test scans\n\nThe student of each snapshot "
            "(`pretrain.snapshot_student`) on 4 random crops of each test scan, each masked at random at "
            "the mask ratio: the same crops and masks for every method (`pretrain/heldout.py`); in "
            "brackets the training loss of the epoch that ended at that step.\n\n" + "\n".join(lines) + "\n"
        )
    return "\n".join(parts)


def _ci(d: dict, scale: float, digits: int) -> str:
    if not math.isfinite(d["mean"]):
        return "n/a"
    text = f"{d['mean'] * scale:+.{digits}f}"
    if math.isfinite(d["lo"]):
        text += f" [{d['lo'] * scale:+.{digits}f}, {d['hi'] * scale:+.{digits}f}]"
    return text


def _results_md(spec, cfg, classes, cells, probe, costs, figure, out: Path, curve_md: str = "") -> str:
    grid = spec.get("grid")
    n_seeds = len(spec["seeds"])
    key = grid["key"] if grid else None
    parts = [
        f"# Experiment {spec['name']}\n\nBase config `{spec['base']}` with overrides "
        f"{list(spec['overrides']) + list(spec.get('command_line_overrides', []))}; "
        f"seeds {spec['seeds']} (cells: mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''})"
        + (
            f"; grid over `{key}`: {grid['values']}"
            + (
                " (each (method, seed) pre-trained once; every grid value fine-tunes from that encoder)"
                if shares_pretraining(spec)
                else " (each grid value pre-trains anew)"
            )
            if grid
            else ""
        )
        + ".\n"
    ]
    # summary: mean Dice and HD95 per method (and grid value), probe beside
    head = (f"| {key} | " if grid else "| ") + "method | DSC (%) | HD95 (mm) | probe bal. acc. (%) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in cells:
        pc = (probe or {}).get("cells", {})
        pcell = pc.get(c["name"]) or pc.get("all")
        for m, e in c["methods"].items():
            pe = (pcell or {}).get("methods", {}).get(m)
            pr = _pm(100 * pe["mean"], 100 * pe["std"] if math.isfinite(pe["std"]) else 0, 1) if pe else "n/a"
            lines.append(
                ("| " + value_name(c["value"]) + " " if grid else "") + f"| {method_label(spec, m)} | "
                f"{_pm(100 * e['dice']['mean'], 100 * e['dice']['std'] if math.isfinite(e['dice']['std']) else 0, 2)} | "
                f"{_pm(e['hd95']['mean'], e['hd95']['std'] if math.isfinite(e['hd95']['std']) else 0, 2)} | {pr} |"
            )
    parts.append(
        "## Mean Dice over the reported organs, HD95, and the frozen-encoder probe\n\n" + "\n".join(lines) + "\n"
    )
    if figure:
        parts.append(
            f"![mean Dice against {key}]({figure.name})\n\n[{figure.name}]({figure.name}): mean Dice "
            "against the grid value per method, error bars ± one std over seeds.\n"
        )
    # paired differences
    plines = [(f"| {key} | " if grid else "| ") + "A - B | ΔDSC (points) [95 % CI] | ΔHD95 (mm) [95 % CI] | seeds |"]
    plines.append("|" + "---|" * (plines[0].count("|") - 1))
    for c in cells:
        for pair, d in c["paired"]["dice"].items():
            h = c["paired"]["hd95"][pair]
            plines.append(
                ("| " + value_name(c["value"]) + " " if grid else "")
                + f"| {pair} | {_ci(d, 100, 2)} | {_ci(h, 1, 2)} | {d['n']} |"
            )
    if len(plines) > 2:
        parts.append(
            "## Paired differences over seeds\n\nA - B per seed (runs with the same seed share the "
            "validation split, the labelled cases and the data order), then the mean and its "
            + INTERVAL
            + ". ΔDSC > 0: A segments better; ΔHD95 < 0: A's boundaries are closer. With 3 to 5 seeds "
            "read the interval as the width the seeds allow, not as a test.\n\n" + "\n".join(plines) + "\n"
        )
    if curve_md:
        parts.append(curve_md)
    elif probe:
        pl = ["| method | balanced accuracy (%) | chance (%) | seeds |", "|---|---|---|---|"]
        ql = ["| A - B | Δ balanced accuracy (points) [95 % CI] | seeds |", "|---|---|---|"]
        texts = []
        for name, cell in probe["cells"].items():
            tag = "" if name == "all" else f" ({name})"
            for m, e in cell["methods"].items():
                ch = statistics.mean(e["chance"].values())
                pl.append(
                    f"| {method_label(spec, m)}{tag} | {_pm(100 * e['mean'], 100 * e['std'] if math.isfinite(e['std']) else 0, 1)}"
                    f" | {100 * ch:.1f} | {e['n']} |"
                )
            for pair, d in cell["paired"].items():
                ql.append(f"| {pair}{tag} | {_ci(d, 100, 2)} | {d['n']} |")
            k = cell["labelled_cases"]
            texts.append(f"{'all' if not k else k} labelled training case{'s' if k != 1 else ''}{tag}")
        fitted = "; ".join(dict.fromkeys(texts))
        why = (
            f"the smallest `{LABELLED}` of the grid"
            if grid and key == LABELLED
            else f"the config's `{LABELLED}` (0: every training case left after the validation split)"
        )
        parts.append(
            "## Frozen-encoder probe\n\nThe encoder UNETR fine-tuning starts from (pre-trained; for `scratch` the "
            "seeded random initialisation of the same ViT), frozen; every token labelled with its patch's majority "
            "class (background included). A class-balanced linear probe is fitted on the tokens of the labelled "
            f"training cases, here {fitted} ({why}, drawn per seed as fine-tuning draws them), and scored on the "
            "test cases by balanced accuracy (the mean over the classes present of the share predicted right). "
            + (
                "One probe per (method, seed): the grid key does not change the encoder. "
                if shares_pretraining(spec) and not (key or "").startswith(ENCODER_KEYS)
                else ""
            )
            + "Files: `probe.json` beside each run"
            + (
                " (`probe/METHOD/seedS/probe.json`)"
                if shares_pretraining(spec) and not (key or "").startswith(ENCODER_KEYS)
                else ""
            )
            + ".\n\n"
            + "\n".join(pl)
            + "\n\n"
            + ("\n".join(ql) + "\n" if len(ql) > 2 else "")
        )
    # Table 1 and Table 3, per grid value
    for c in cells:
        tag = f" ({c['name']})" if c["name"] else ""
        rows = {method_label(spec, m): a for m, a in c["aggregate"].items()}
        parts.append(
            f"## Table 1 style{tag}: per organ (DSC %) and average DSC / HD95 (mm)\n\n{paper_table(rows, classes)}"
        )
        ablation = [m for m in ("no_lpred", "no_learn_to_mask", "hpm") if m in c["aggregate"]]
        if not grid or len(ablation) > 1:  # with a grid only when there is an ablation to show
            parts.append(f"## Table 3 style{tag}: ablation\n\n{_table3(c['aggregate'], ablation)}\n")
    parts.append(
        f"## Pre-training cost\n\n{_cost_table(costs)}\n\nTime per step is the median wall time of an "
        "optimizer step (data + compute); peak memory is the pre-training process's peak (CUDA: max "
        "allocated; CPU: max resident set size).\n"
    )
    return "\n".join(parts)


def _table3(agg: dict, ablation: list[str]) -> str:
    lines = ["| components | DSC | HD95 |", "|---|---|---|"]
    names = {"no_lpred": "w/o L_pred, learn to mask", "no_learn_to_mask": "w/o learn to mask", "hpm": "Ours (HPM)"}
    for m in ablation:
        mean = agg[m]["mean"]
        lines.append(
            f"| {names[m]} | {_pm(mean.get('dice_mean'), mean.get('dice_std'), 3)} | "
            f"{_pm(mean.get('hd95_mean'), mean.get('hd95_std'), 2)} |"
        )
    return "\n".join(lines)


def _cost_table(costs: dict) -> str:
    cost_lines = [
        "| method | time per step (s) | time per epoch (s) | peak memory (MiB) | step time vs mae |",
        "|---|---|---|---|---|",
    ]
    base = statistics.median([c["step_s"] for c in costs["mae"]]) if "mae" in costs else None
    for m, cs in costs.items():
        st = statistics.median([c["step_s"] for c in cs])
        ep = [c["epoch_s"] for c in cs if c["epoch_s"]]
        mem = [c["peak_memory_mib"] for c in cs if c.get("peak_memory_mib")]
        cost_lines.append(
            f"| {m} | {st:.3f} | {statistics.median(ep) if ep else float('nan'):.1f} | "
            f"{max(mem) if mem else float('nan'):.0f} | {st / base if base else float('nan'):.2f} |"
        )
    return "\n".join(cost_lines)


def _pm(mean, std, digits) -> str:
    if mean is None or (isinstance(mean, float) and not math.isfinite(mean)):
        return "n/a"
    return f"{mean:.{digits}f} ± {std or 0:.{digits}f}"


def _finite(x):
    """NaN (an undefined mean or std) as JSON null, so that results.json is standard JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _json_default(x):
    if isinstance(x, Path):
        return str(x)
    return None
