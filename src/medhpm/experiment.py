"""The experiment runner: methods x seeds on one data set and split, same budget, then the paper's tables.

An experiment config (packaged under ``configs/experiments/`` or a YAML path)::

    name: demo_experiment
    base: demo                 # the pipeline config every run starts from
    overrides: [pretrain.epochs=8]
    methods: [scratch, mae, hpm, no_lpred, no_learn_to_mask, unet, imagenet]
    seeds: [0, 1]
    imagenet_weights: null     # a 2D ViT-B/16 checkpoint (timm or MAE layout) for the `imagenet` row

Methods: ``scratch`` (UNETR, no pre-training), ``mae``/``hpm``/``no_lpred``/``no_learn_to_mask``
(pre-training then UNETR), ``imagenet`` (UNETR from an inflated 2D ViT), ``unet`` (MONAI DynUNet CNN from
scratch, the paper's U-Net reference row). Each (method, seed) runs in its own process (so its peak memory
is its own) under ``OUT/runs/METHOD/seedS``; finished runs are skipped and an interrupted one resumes.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from medhpm.config import METHODS, ConfigError, load_config, read_yaml
from medhpm.data.sources import resolve_dataset
from medhpm.evaluate.classes import parse_classes
from medhpm.evaluate.tables import aggregate_seeds, paper_table
from medhpm.runtime.files import atomic_write_text, check_writable, run_folder_lock, save_config
from medhpm.runtime.logging import read_metrics

ALL_METHODS = ("scratch", "unet", "imagenet") + METHODS  # METHODS: the pre-training methods
LABELS = {"unet": "U-Net (DynUNet)", "scratch": "UNETR", "imagenet": "UNETR+ImageNet", "mae": "UNETR+MAE",
          "no_lpred": "UNETR+HPM w/o L_pred, learn to mask", "no_learn_to_mask": "UNETR+HPM w/o learn to mask",
          "hpm": "UNETR+HPM"}
_KEYS = {"name", "base", "overrides", "methods", "seeds", "imagenet_weights", "description"}


def load_experiment(name_or_path: str) -> dict:
    """An experiment spec (packaged name or YAML path), checked; defaults filled in."""
    spec, where = read_yaml(name_or_path, folder="experiments", what="experiment")
    unknown = set(spec) - _KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where}; allowed: {sorted(_KEYS)}")
    spec.setdefault("name", Path(name_or_path).stem)
    spec.setdefault("overrides", [])
    spec.setdefault("seeds", [0])
    bad = [m for m in spec.get("methods", []) if m not in ALL_METHODS]
    if not spec.get("methods") or bad:
        raise ConfigError(f"{where}: 'methods' must list some of {', '.join(ALL_METHODS)} (bad: {bad})")
    if "imagenet" in spec["methods"] and not spec.get("imagenet_weights"):
        raise ConfigError(f"{where}: method 'imagenet' needs 'imagenet_weights' (a 2D ViT-B/16 checkpoint you supply)")
    if "base" not in spec:
        raise ConfigError(f"{where}: 'base' (the pipeline config, e.g. demo or btcv_paper) is missing")
    return spec


def run_experiment(config: str, out: str | Path | None = None, overrides: list[str] | None = None) -> Path:
    spec = load_experiment(config)
    out = Path(out or Path("runs") / f"experiment-{spec['name']}")
    check_writable(out)
    with run_folder_lock(out, what="experiment"):  # one experiment per folder; each run locks its own
        return _run_experiment(spec, out, overrides)


def _run_experiment(spec: dict, out: Path, overrides: list[str] | None) -> Path:
    cfg = load_config(spec["base"], list(spec["overrides"]) + list(overrides or []))
    spec["command_line_overrides"] = list(overrides or [])
    atomic_write_text(out / "experiment.json", json.dumps(spec, indent=2))
    if cfg.data.dataset == "phantom":
        dataset = resolve_dataset(cfg.data, out)
    else:
        dataset = Path(cfg.data.dataset)
    runs = []
    total = len(spec["methods"]) * len(spec["seeds"])
    t0 = time.time()
    for seed in spec["seeds"]:
        for method in spec["methods"]:
            run_dir = out / "runs" / method / f"seed{seed}"
            done = (run_dir / "evaluation" / "metrics.json").exists()
            print(f"\n##### [{len(runs) + 1}/{total}] {method}, seed {seed}: "
                  f"{'done, skipped' if done else 'running'} ({(time.time() - t0) / 60:.1f} min so far) #####",
                  flush=True)
            if not done:
                _run_one(cfg, spec, method, seed, dataset, run_dir)
            runs.append({"method": method, "seed": seed, "dir": run_dir})
    return write_experiment_results(out, spec, cfg, runs)


def _run_one(cfg, spec, method, seed, dataset, run_dir: Path) -> None:
    """One (method, seed) run in its own process: ``python -m medhpm.pipeline`` (see its ``main``)."""
    run_cfg = replace(cfg, seed=int(seed))
    if method == "unet":
        run_cfg = replace(run_cfg, finetune=replace(run_cfg.finetune, architecture="dynunet"))
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(run_cfg, run_dir / "config.yaml")
    cmd = [sys.executable, "-m", "medhpm.pipeline", "--config", str(run_dir / "config.yaml"),
           "--dataset", str(dataset), "--out", str(run_dir), "--name", method]
    if method in METHODS:  # pre-training, then UNETR from its encoder
        cmd += ["--pretrain", method]
    elif method == "imagenet":  # UNETR from the inflated 2D ViT; scratch and unet start from nothing
        cmd += ["--init", str(spec["imagenet_weights"])]
    rc = subprocess.call(cmd)
    if rc != 0:
        raise RuntimeError(f"run {method} seed {seed} failed (exit {rc}); rerun the same command to resume it")


def _pretrain_cost(run_dir: Path) -> dict | None:
    pt = run_dir / "pretrain"
    recs = read_metrics(pt / "metrics.jsonl")
    steps = [r["compute_time"] + r.get("data_time", 0.0) for r in recs if r.get("kind") == "step" and "compute_time" in r]
    epochs = [r["epoch_time"] for r in recs if r.get("kind") == "epoch" and "epoch_time" in r]
    if not steps:
        return None
    summ = json.loads((pt / "summary.json").read_text()) if (pt / "summary.json").exists() else {}
    return {"step_s": statistics.median(steps[1:] or steps), "compute_step_s": statistics.median(
        [r["compute_time"] for r in recs if r.get("kind") == "step"][1:] or steps),
        "epoch_s": statistics.median(epochs) if epochs else None, "peak_memory_mib": summ.get("peak_memory_mib"),
        "peak_memory_kind": summ.get("peak_memory_kind")}


def write_experiment_results(out: Path, spec: dict, cfg, runs: list[dict]) -> Path:
    classes = parse_classes(cfg.finetune.reported)
    per_method: dict[str, list] = {}
    costs: dict[str, list] = {}
    for r in runs:
        m = json.loads((r["dir"] / "evaluation" / "metrics.json").read_text())
        per_method.setdefault(r["method"], []).append(m["summary"])
        c = _pretrain_cost(r["dir"])
        if c:
            costs.setdefault(r["method"], []).append(c)
    rows = {LABELS[m]: aggregate_seeds(s) for m, s in per_method.items()}
    table1 = paper_table(rows, classes)
    ablation = [m for m in ("no_lpred", "no_learn_to_mask", "hpm") if m in per_method]
    lines = ["| components | DSC | HD95 |", "|---|---|---|"]
    names = {"no_lpred": "w/o L_pred, learn to mask", "no_learn_to_mask": "w/o learn to mask", "hpm": "Ours (HPM)"}
    for m in ablation:
        agg = aggregate_seeds(per_method[m])
        mean = agg["mean"]
        lines.append(f"| {names[m]} | {_pm(mean.get('dice_mean'), mean.get('dice_std'), 3)} | "
                     f"{_pm(mean.get('hd95_mean'), mean.get('hd95_std'), 2)} |")
    table3 = "\n".join(lines)
    cost_lines = ["| method | time per step (s) | time per epoch (s) | peak memory (MiB) | step time vs mae |",
                  "|---|---|---|---|---|"]
    base = statistics.median([c["step_s"] for c in costs["mae"]]) if "mae" in costs else None
    for m, cs in costs.items():
        st = statistics.median([c["step_s"] for c in cs])
        ep = [c["epoch_s"] for c in cs if c["epoch_s"]]
        mem = [c["peak_memory_mib"] for c in cs if c.get("peak_memory_mib")]
        cost_lines.append(f"| {m} | {st:.3f} | {statistics.median(ep) if ep else float('nan'):.1f} | "
                          f"{max(mem) if mem else float('nan'):.0f} | {st / base if base else float('nan'):.2f} |")
    cost = "\n".join(cost_lines)
    n_seeds = len(spec["seeds"])
    md = (f"# Experiment {spec['name']}\n\nBase config `{spec['base']}` with overrides "
          f"{list(spec['overrides']) + list(spec.get('command_line_overrides', []))}; "
          f"seeds {spec['seeds']} (cells: mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''}).\n\n"
          f"## Table 1 style: per organ (DSC %) and average DSC / HD95 (mm)\n\n{table1}\n\n"
          f"## Table 3 style: ablation\n\n{table3}\n\n## Pre-training cost\n\n{cost}\n\n"
          "Time per step is the median wall time of an optimizer step (data + compute); peak memory is the "
          "pre-training process's peak (CUDA: max allocated; CPU: max resident set size).\n")
    atomic_write_text(out / "results.md", md)
    atomic_write_text(out / "results.json", json.dumps(
        {"spec": spec, "methods": {m: aggregate_seeds(s) for m, s in per_method.items()},
         "per_seed": per_method, "pretrain_cost": costs}, indent=2, default=_nan_none))
    print("\n" + md)
    return out / "results.md"


def _pm(mean, std, digits) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {std or 0:.{digits}f}"


def _nan_none(x):
    return None
