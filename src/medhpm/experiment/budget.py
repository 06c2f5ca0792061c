"""An experiment's budget: the optimizer steps each method's runs took in pre-training and fine-tuning, and
the wall time of every stage (each run's ``timings.json``), as ``results.json`` records them and as the
"Budget and wall time" table of ``results.md``."""

from __future__ import annotations

import json
import math
from pathlib import Path

from medhpm.config import METHODS
from medhpm.evaluate.tables import mean_std
from medhpm.experiment.spec import base_method, method_label
from medhpm.pipeline import EVALUATE_STAGE, FINETUNE_STAGE, PREDICT_STAGE, PRETRAIN_STAGE, read_timings


def summary_steps(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "summary.json").read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_times(folder: Path) -> dict[str, float]:
    """A run's ``timings.json`` (:func:`pipeline.read_timings`), its numbers as floats."""
    return {k: float(v) for k, v in read_timings(folder / "timings.json").items() if isinstance(v, (int, float))}


def _budget(spec: dict, runs: list[dict], probes: list[dict] | None = None) -> dict:
    """Per method: the optimizer steps of pre-training and fine-tuning, and the wall time of each stage per
    run, from each run's ``timings.json`` (``python -m medhpm.pipeline`` writes it); a stage a run found
    done (a pre-training shared by a grid, a resumed run's finished stages) counts where it ran, once."""
    methods: dict = {}
    total, timed, seen_pt, seen_run = 0.0, 0, set(), set()
    for r in runs:
        if r["dir"] in seen_run:  # a run without pre-training, in the pairs of every pre-training seed
            continue
        seen_run.add(r["dir"])
        e = methods.setdefault(
            r["method"],
            {
                "pretrain_steps": [],
                "finetune_steps": [],
                "pretrain_s": [],
                "finetune_s": [],
                "predict_evaluate_s": [],
                "runs": 0,
            },
        )
        e["runs"] += 1
        pt = r.get("pretrain_dir") or r["dir"] / "pretrain"
        base = base_method(spec, r["method"])
        if base in METHODS and pt not in seen_pt:
            seen_pt.add(pt)
            steps = summary_steps(pt)
            if steps is not None:
                e["pretrain_steps"].append(steps)
            if r.get("pretrain_job"):  # a pre-training run as a job of its own (pretrain_seeds)
                pre = _read_times(r["pretrain_job"]).get(PRETRAIN_STAGE.format(method=base))
                if pre is not None:
                    e["pretrain_s"].append(pre)
                    total += pre
        steps = summary_steps(r["dir"] / "finetune")
        if steps is not None:
            e["finetune_steps"].append(steps)
        if not (r["dir"] / "timings.json").exists():
            continue  # a run made before runs recorded their times
        timed += 1
        stage_s = _read_times(r["dir"])
        total += sum(stage_s.values())
        pre = stage_s.get(PRETRAIN_STAGE.format(method=base))
        if pre is not None:
            e["pretrain_s"].append(pre)
        if FINETUNE_STAGE in stage_s:
            e["finetune_s"].append(stage_s[FINETUNE_STAGE])
        rest = [stage_s[k] for k in (PREDICT_STAGE, EVALUATE_STAGE) if k in stage_s]
        if rest:
            e["predict_evaluate_s"].append(sum(rest))
    probe_s = sum(float(p["result"].get("seconds") or 0.0) for p in probes or [])
    return {
        "methods": methods,
        "stage_seconds": total,
        "probe_seconds": probe_s,
        "runs": len(seen_run),
        "timed_runs": timed,
    }


def _budget_md(spec: dict, budget: dict) -> str:
    def steps(v):
        return "n/a" if not v else (f"{v[0]}" if min(v) == max(v) else f"{min(v)}-{max(v)}")

    def mean_sd(v, scale):
        if not v:
            return "n/a"
        m, sd, _ = mean_std([x / scale for x in v])
        return f"{m:.1f} ± {sd if math.isfinite(sd) else 0:.1f}" if len(v) > 1 else f"{m:.1f}"

    lines = [
        "| method | pre-training steps | fine-tuning steps | pre-training (min) | fine-tuning (min) | "
        "prediction + evaluation (s) | runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, e in budget["methods"].items():
        pre = base_method(spec, m) in METHODS
        lines.append(
            f"| {method_label(spec, m)} | {steps(e['pretrain_steps']) if pre else '-'} | "
            f"{steps(e['finetune_steps'])} | {mean_sd(e['pretrain_s'], 60) if pre else '-'} | "
            f"{mean_sd(e['finetune_s'], 60)} | {mean_sd(e['predict_evaluate_s'], 1)} | {e['runs']} |"
        )
    untimed = budget["runs"] - budget["timed_runs"]
    probes = (
        f", and the frozen-encoder probes {budget['probe_seconds'] / 60:.1f} min" if budget.get("probe_seconds") else ""
    )
    note = (
        f"Wall time per run, mean ± std over the runs that ran the stage (each run's `timings.json`). "
        f"All stages of the {budget['timed_runs']} timed runs: **{budget['stage_seconds'] / 60:.1f} min**"
        f"{probes}; a pre-training shared by a grid's runs counts once; the start-up of each run's process "
        "is not included."
    )
    if untimed:
        note += f" {untimed} run(s) were made before runs recorded their times and are not counted."
    return "\n".join(lines) + "\n\n" + note + "\n"
