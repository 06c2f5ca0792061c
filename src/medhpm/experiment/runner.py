"""Running an experiment: every planned pre-training, run and probe, each in its own process where it
trains, resumable (finished ones are skipped, an interrupted one resumes), with the time left printed.

:func:`planned_runs` and :func:`planned_pretrainings` say what runs where; :func:`run_experiment` runs them
and hands the finished runs to :mod:`medhpm.experiment.report`.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from medhpm.config import METHODS
from medhpm.data.sources import resolve_dataset
from medhpm.experiment.budget import summary_steps
from medhpm.experiment.report import PROBES, loss_curve, probe_scores, write_experiment_results
from medhpm.experiment.spec import (
    ENCODER_KEYS,
    LABELLED,
    base_method,
    grid_cells,
    label_draws,
    load_experiment,
    method_cfg,
    pretrained_as,
    shares_pretraining,
)
from medhpm.runtime.files import atomic_write_text, check_writable, run_folder_lock, save_config
from medhpm.pretrain.heldout import run_heldout
from medhpm.segment.encoder_probe import run_noise_floor, run_probe


def run_experiment(config: str, out: str | Path | None = None, overrides: list[str] | None = None) -> Path:
    spec = load_experiment(config)
    out = Path(out or Path("runs") / f"experiment-{spec['name']}")
    check_writable(out)
    with run_folder_lock(out, what="experiment"):  # one experiment per folder; each run locks its own
        return _run_experiment(spec, out, overrides)


def _probe_cell(spec: dict, cells: list[dict]) -> dict:
    """The cell whose config the shared probe uses: the fewest labelled cases of a labelled-cases grid
    (0 means all), else the first."""
    if spec["grid"] and spec["grid"]["key"] == LABELLED:
        return min(cells, key=lambda c: c["cfg"].finetune.labelled_cases or math.inf)
    return cells[0]


def planned_runs(spec: dict, out: Path, overrides: list[str] | None = None) -> list[dict]:
    """Every run of ``spec`` under ``out``, in the order they run (seed, grid value, method): its method
    name, the built-in method it runs, seed, grid cell and value, run folder, pre-training folder (None
    without pre-training) and the resolved config it runs with (the experiment's overrides, the grid
    value's, then a variant's own)."""
    cells = grid_cells(spec, overrides)
    if label_draws(spec):
        return _draw_runs(spec, out, cells)
    shared = shares_pretraining(spec)
    runs = []
    for seed in spec["seeds"]:
        for cell in cells:
            for method in spec["methods"]:
                where = out / "runs" / cell["name"] if cell["name"] else out / "runs"
                run_dir = where / method / f"seed{seed}"
                pt_dir = None
                if base_method(spec, method) in METHODS:
                    pt_dir = out / "pretrain" / method / f"seed{seed}" if shared else run_dir / "pretrain"
                runs.append(
                    {
                        "method": method,
                        "base": base_method(spec, method),
                        "seed": seed,
                        "dir": run_dir,
                        "cell": cell["name"],
                        "value": cell["value"],
                        "pretrain_dir": pt_dir,
                        "cfg": method_cfg(spec, cell, method),
                    }
                )
    return runs


def planned_pretrainings(spec: dict, out: Path, overrides: list[str] | None = None) -> list[dict]:
    """With ``pretrain_seeds``: the one pre-training of each (pre-training method, pre-training seed), in
    the order they run: its method name, seed, job folder ``OUT/pretrain/METHOD/seedP`` (its
    ``timings.json``), pre-training folder (the job's ``pretrain/``: checkpoints, ``snapshots/``) and the
    config it runs with (the experiment's overrides, then the method's own; seed P)."""
    if not label_draws(spec):
        return []
    cell = grid_cells(spec, overrides)[0]  # the grid key is one pre-training does not read
    jobs = []
    for p in spec["pretrain_seeds"]:
        for m in spec["methods"]:
            if base_method(spec, m) not in METHODS or pretrained_as(spec, m) != m:
                continue
            job = out / "pretrain" / m / f"seed{p}"
            cfg = method_cfg(spec, cell, m)  # the config the job runs: its method set, as the pipeline sets it
            cfg = replace(cfg, seed=int(p), pretrain=replace(cfg.pretrain, method=base_method(spec, m)))
            jobs.append(
                {"method": m, "base": base_method(spec, m), "seed": p, "dir": job, "pt": job / "pretrain", "cfg": cfg}
            )
    return jobs


def _draw_runs(spec: dict, out: Path, cells: list[dict]) -> list[dict]:
    """:func:`planned_runs` with ``pretrain_seeds``: every (pre-training seed P, label draw D, grid value,
    method) fine-tunes with seed D (which draws its labelled cases, as for every method of the draw) from
    the encoder of the (method, P) pre-training at the end or at its ``M@STEP`` snapshot. Runs that do not
    pre-train do not depend on P: one run per draw, in every P's pairs. ``seed`` is the pairing key: D
    with one pre-training seed, ``pPdD`` with several."""
    runs, several = [], len(spec["pretrain_seeds"]) > 1
    for p in spec["pretrain_seeds"]:
        for d in spec["seeds"]:
            for cell in cells:
                where = out / "runs" / cell["name"] if cell["name"] else out / "runs"
                for method in spec["methods"]:
                    base = base_method(spec, method)
                    r = {
                        "method": method,
                        "base": base,
                        "seed": f"p{p}d{d}" if several else d,
                        "run_seed": d,
                        "cell": cell["name"],
                        "value": cell["value"],
                        "pretrain_dir": None,
                        "pretrain_job": None,
                        "init": None,
                        "cfg": method_cfg(spec, cell, method),
                    }
                    if base in METHODS:
                        job = out / "pretrain" / pretrained_as(spec, method) / f"seed{p}"
                        step = spec["variants"].get(method, {}).get("from_step")
                        r.update(
                            pretrain_job=job,
                            pretrain_dir=job / "pretrain",
                            init=job
                            / "pretrain"
                            / (f"snapshots/encoder_step{step:07d}.safetensors" if step else "encoder.safetensors"),
                            dir=where / method / (f"pretrain_seed{p}" if several else "") / f"seed{d}",
                        )
                    else:
                        r["dir"] = where / method / f"seed{d}"
                    runs.append(r)
    return runs


class _Remaining:
    """Progress and the time left of a list of jobs, from the mean of those that ran in this call."""

    took: list[float]  # seconds of each job that ran

    def __init__(self, total: int, what: str):
        self.total, self.what, self.took, self.t0 = total, what, [], time.time()

    def line(self, i: int, label: str, state: str) -> str:
        left = self.total - i
        eta = (
            f"about {left * statistics.mean(self.took) / 60:.0f} min left for the {left} {self.what} to go "
            f"({statistics.mean(self.took) / 60:.1f} min each so far)"
            if self.took and left
            else "time left: known once one has run"
            if left
            else "the last one"
        )
        return (
            f"\n##### [{i + 1}/{self.total}] {label}: {state} ({(time.time() - self.t0) / 60:.1f} min so far; "
            f"{eta}) #####"
        )

    def ran(self, seconds: float) -> None:
        self.took.append(seconds)


def _run_pretrainings(jobs: list[dict], dataset: Path, after=None) -> None:
    """Each pre-training job in its own process (``python -m medhpm.pipeline --pretrain-only``): skipped when
    finished, resumed from ``last.pt`` when interrupted. ``after(job)`` runs after each (its probes: an
    interrupted experiment keeps the curves of the pre-trainings it finished)."""
    eta = _Remaining(len(jobs), "pre-trainings")
    for i, j in enumerate(jobs):
        done = (j["pt"] / "final.pt").exists() and (j["pt"] / "encoder.safetensors").exists()
        print(
            eta.line(
                i, f"pre-training {j['method']}, pre-training seed {j['seed']}", "done, skipped" if done else "running"
            ),
            flush=True,
        )
        if not done:
            t0 = time.time()
            _pretrain_job(j, dataset)
            eta.ran(time.time() - t0)
        if after is not None:
            after(j)


def _pretrain_job(j: dict, dataset: Path) -> None:
    j["dir"].mkdir(parents=True, exist_ok=True)
    save_config(j["cfg"], j["dir"] / "config.yaml")
    rc = subprocess.call(
        [
            sys.executable,
            "-m",
            "medhpm.pipeline",
            "--config",
            str(j["dir"] / "config.yaml"),
            "--dataset",
            str(dataset),
            "--out",
            str(j["dir"]),
            "--pretrain",
            j["base"],
            "--pretrain-only",
        ]
    )
    if rc != 0:
        raise RuntimeError(
            f"pre-training {j['method']} seed {j['seed']} failed (exit {rc}); rerun the same command to resume it"
        )


def _run_experiment(spec: dict, out: Path, overrides: list[str] | None) -> Path:
    cells = grid_cells(spec, overrides)
    cfg = cells[0]["cfg"]
    spec["command_line_overrides"] = list(overrides or [])
    atomic_write_text(out / "experiment.json", json.dumps(spec, indent=2))
    if cfg.data.dataset == "phantom":
        dataset = resolve_dataset(cfg.data, out)
    else:
        dataset = Path(cfg.data.dataset)
    shared = shares_pretraining(spec)
    draws = label_draws(spec)
    jobs = planned_pretrainings(spec, out, overrides)
    _run_pretrainings(
        jobs, dataset, after=(lambda j: _run_probe_curve(spec, cells, [j], dataset, out)) if spec["probe"] else None
    )
    plan = planned_runs(spec, out, overrides)
    eta = _Remaining(len({r["dir"] for r in plan}), "runs")
    seen: set = set()
    for r in plan:
        if r["dir"] in seen:  # a run without pre-training, paired with every pre-training seed's runs
            continue
        seen.add(r["dir"])
        pt_dir = r["pretrain_dir"]
        done = (r["dir"] / "evaluation" / "metrics.json").exists()
        at = f", {r['cell']}" if r["cell"] else ""
        reuse = (
            (
                " (pre-trained once, shared by the grid: "
                f"{'reusing' if (pt_dir / 'final.pt').exists() else 'making'} {pt_dir})"
            )
            if shared and pt_dir and not draws
            else ""
        )
        frm = f" (fine-tuning from {r['init']})" if draws and r.get("init") else ""
        seed = f"label draw {r['run_seed']}" if draws else f"seed {r['seed']}"
        print(
            eta.line(len(seen) - 1, f"{r['method']}, {seed}{at}", "done, skipped" if done else "running" + reuse + frm),
            flush=True,
        )
        if not done:
            t0 = time.time()
            _run_one(r, spec, dataset, pt_dir if shared and not draws else None)
            eta.ran(time.time() - t0)
    runs = [{k: v for k, v in r.items() if k not in ("cfg", "base")} for r in plan]
    if draws:
        curve = _run_probe_curve(spec, cells, jobs, dataset, out) if spec["probe"] else None  # read back
        return write_experiment_results(out, spec, cfg, runs, [], curve)
    probes = _run_probes(spec, cells, runs, dataset, out, shared) if spec["probe"] else []
    return write_experiment_results(out, spec, cfg, runs, probes)


def run_command(r: dict, spec: dict, dataset, pretrain_dir: Path | None = None):
    """``(config, command)`` of one run of :func:`planned_runs`: the config it runs with (its seed: the
    run's, with ``pretrain_seeds`` the label draw's) and the ``python -m medhpm.pipeline`` command line
    (its ``--config`` is ``RUN/config.yaml``, which :func:`_run_one` writes)."""
    name, method, run_dir = r["method"], base_method(spec, r["method"]), r["dir"]
    run_cfg = replace(r["cfg"], seed=int(r.get("run_seed", r["seed"])))
    if method == "unet":
        run_cfg = replace(run_cfg, finetune=replace(run_cfg.finetune, architecture="dynunet"))
    cmd = [
        sys.executable,
        "-m",
        "medhpm.pipeline",
        "--config",
        str(run_dir / "config.yaml"),
        "--dataset",
        str(dataset),
        "--out",
        str(run_dir),
        "--name",
        name,
    ]
    if method in METHODS and r.get("init"):  # UNETR from a pre-training made before (pretrain_seeds)
        cmd += ["--init", str(r["init"])]
    elif method in METHODS:  # pre-training, then UNETR from its encoder
        cmd += ["--pretrain", method]
        if pretrain_dir is not None:  # one pre-training shared by the grid's runs
            cmd += ["--pretrain-dir", str(pretrain_dir)]
    elif method == "imagenet":  # UNETR from the inflated 2D ViT; scratch and unet start from nothing
        cmd += ["--init", str(spec["imagenet_weights"])]
    return run_cfg, cmd


def _run_one(r: dict, spec: dict, dataset, pretrain_dir: Path | None = None) -> None:
    """One run of :func:`planned_runs` in its own process (:func:`run_command`); a variant runs its method
    under its own name. With ``pretrain_seeds`` a pre-training method's run fine-tunes from the encoder
    ``r["init"]`` of its finished pre-training."""
    name, seed = r["method"], r.get("run_seed", r["seed"])
    if r.get("init") and not Path(r["init"]).exists():
        raise FileNotFoundError(
            f"run {name} seed {seed}: the encoder it fine-tunes from, {r['init']}, does not "
            "exist (its pre-training did not write that snapshot)"
        )
    run_cfg, cmd = run_command(r, spec, dataset, pretrain_dir)
    r["dir"].mkdir(parents=True, exist_ok=True)
    save_config(run_cfg, r["dir"] / "config.yaml")
    rc = subprocess.call(cmd)
    if rc != 0:
        raise RuntimeError(f"run {name} seed {seed} failed (exit {rc}); rerun the same command to resume it")


def _run_probes(spec: dict, cells: list[dict], runs: list[dict], dataset: Path, out: Path, shared: bool) -> list[dict]:
    """The frozen-encoder probe of every (method, seed): once per encoder (per pre-training; per grid value
    when the grid key changes the encoder). ``unet`` has no ViT encoder and no probe."""
    per_cell = not shared or spec["grid"]["key"].startswith(ENCODER_KEYS)
    pcell = _probe_cell(spec, cells)
    probes, seen = [], set()
    for r in runs:
        base = base_method(spec, r["method"])
        if base == "unet" or (not per_cell and r["cell"] != pcell["name"]):
            continue
        cell = next(c for c in cells if c["name"] == r["cell"])
        mcfg = method_cfg(spec, cell, r["method"])
        if mcfg.finetune.architecture != "unetr":  # no ViT encoder to probe
            continue
        path = (r["dir"] if per_cell else out / "probe" / r["method"] / f"seed{r['seed']}") / "probe.json"
        if path in seen:
            continue
        seen.add(path)
        init = None
        if base in METHODS:
            init = r["pretrain_dir"] / "encoder.safetensors"
        elif base == "imagenet":
            init = spec["imagenet_weights"]
        if not path.exists():
            print(f"[probe] {r['method']}, seed {r['seed']}: frozen-encoder probe -> {path}", flush=True)
        res = run_probe(replace(mcfg, seed=int(r["seed"])), dataset, path, init=init)
        probes.append(
            {
                "method": r["method"],
                "seed": r["seed"],
                "cell": r["cell"] if per_cell else None,
                "path": path,
                "result": res,
            }
        )
    return probes


def _run_probe_curve(spec: dict, cells: list[dict], jobs: list[dict], dataset: Path, out: Path) -> dict:
    """With ``pretrain_seeds``: the frozen-encoder probes at every snapshot (and the end) of every
    pre-training, and their noise floor over the random initialisations fine-tuning from scratch starts
    from (one per label draw). Every probe learns from ALL training cases (the instrument, not the
    label-scarce setting) with the same folds (seeded with the first label draw), so the encoders are
    compared on equal terms; files under ``OUT/probe/``. Returns ``{"floor": ..., "methods": {M: {P:
    {"steps": [...], PROBE: [...], "loss_rec": [[step, loss], ...], "heldout_loss": [...]}}}, ...}``; with
    ``pretrain.snapshot_student`` each snapshot's reconstruction loss on the test scans (``heldout_loss``,
    :func:`medhpm.pretrain.heldout.run_heldout`, None where the run kept no student), beside the training
    loss of each epoch (``loss_rec``)."""
    seed0 = int(spec["seeds"][0])
    cell = cells[0]
    base_cfg = replace(cell["cfg"], seed=seed0)
    floor_path = out / "probe" / "noise_floor.json"
    if not floor_path.exists():
        print(f"[probe] the noise floor: random initialisations {spec['seeds']} -> {floor_path}", flush=True)
    floor = run_noise_floor(base_cfg, dataset, floor_path, seeds=[int(x) for x in spec["seeds"]], labelled_cases=0)
    curve: dict = {
        "floor": {k: floor["summary"][k] for k in PROBES},
        "floor_file": str(floor_path.relative_to(out)),
        "cases_seed": seed0,
        "training_cases": len(floor["training_cases"]),
        "test_cases": len(floor["test_cases"]),
        "methods": {},
        "seconds": float(floor.get("seconds") or 0),
    }
    for j in jobs:
        pt = j["pt"]
        final = summary_steps(pt)
        points = [
            (s_, pt / "snapshots" / f"encoder_step{s_:07d}.safetensors")
            for s_ in j["cfg"].pretrain.snapshot_steps
            if final is None or s_ <= final
        ]
        if final is not None and final not in j["cfg"].pretrain.snapshot_steps:
            points.append((final, pt / "encoder.safetensors"))
        e: dict[str, Any] = {
            "steps": [],
            **{k: [] for k in PROBES},
            "files": [],
            "loss_rec": loss_curve(pt),
            "heldout_loss": [],
        }
        for step, enc in points:
            student = pt / "snapshots" / f"student_step{step:07d}.safetensors"  # pretrain.snapshot_student
            held = None
            if student.exists():
                hpath = out / "probe" / j["method"] / f"seed{j['seed']}" / f"heldout_step{step:07d}.json"
                hres = run_heldout(j["cfg"], dataset, student, hpath, seed=seed0)
                held = hres["loss_rec"]
                curve["seconds"] += float(hres.get("seconds") or 0)
            e["heldout_loss"].append(held)
            path = out / "probe" / j["method"] / f"seed{j['seed']}" / f"step{step:07d}.json"
            if not path.exists():
                print(f"[probe] {j['method']}, pre-training seed {j['seed']}, step {step}: {enc} -> {path}", flush=True)
            res = run_probe(replace(j["cfg"], seed=seed0), dataset, path, init=enc, labelled_cases=0)
            e["steps"].append(step)
            e["files"].append(str(path.relative_to(out)))
            for k, v in probe_scores(res).items():
                e[k].append(v)
            curve["seconds"] += float(res.get("seconds") or 0)
        curve["methods"].setdefault(j["method"], {})[j["seed"]] = e
    return curve
