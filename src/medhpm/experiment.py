"""The experiment runner: methods x seeds (x a grid over one config key) on one data set and split, same
budget, then the paper's tables, paired differences over seeds and a frozen-encoder probe.

An experiment config (packaged under ``configs/experiments/`` or a YAML path)::

    name: demo_experiment
    base: demo                 # the pipeline config every run starts from
    overrides: [pretrain.epochs=8]
    methods: [scratch, mae, hpm, no_lpred, no_learn_to_mask, unet, imagenet]
    seeds: [0, 1]
    imagenet_weights: null     # a 2D ViT-B/16 checkpoint (timm or MAE layout) for the `imagenet` row
    grid: {key: finetune.labelled_cases, values: [1, 3]}   # optional: one config key, several values
    probe: true                # the frozen-encoder probe per (method, seed) (default true)
    variants:                  # optional: named methods = a method above with overrides of their own
      hpm_full: {method: hpm, overrides: [pretrain.teacher_view=full], label: "UNETR+HPM (full-view teacher)"}
    pairs: [[hpm, hpm_full]]   # optional: paired differences A - B beyond the default ones

Methods: ``scratch`` (UNETR, no pre-training), ``mae``/``hpm``/``no_lpred``/``no_learn_to_mask``
(pre-training then UNETR), ``imagenet`` (UNETR from an inflated 2D ViT), ``unet`` (MONAI DynUNet CNN from
scratch, the paper's U-Net reference row), and any variant the spec names (one of these with its own
config overrides, applied after the experiment's and the grid's: e.g. HPM with each teacher view on the same
data and seeds). Each (method, seed) runs in its own process (so its peak memory
is its own) under ``OUT/runs/METHOD/seedS``, or with a grid ``OUT/runs/KEY=VALUE/METHOD/seedS``; finished
runs are skipped and an interrupted one resumes. When the grid key is one pre-training does not depend on
(``finetune.*``, ``inference.*``, UNETR's decoder keys), each (method, seed) is pre-trained once, under
``OUT/pretrain/METHOD/seedS``, and every grid value fine-tunes from that encoder. See docs/experiments.md.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from medhpm.config import METHODS, STAGE_ONLY_KEYS, ConfigError, get_key, load_config, read_yaml
from medhpm.data.sources import resolve_dataset
from medhpm.evaluate.classes import parse_classes
from medhpm.evaluate.paired import paired_difference
from medhpm.evaluate.tables import aggregate_seeds, mean_std, paper_table
from medhpm.pipeline import EVALUATE_STAGE, FINETUNE_STAGE, PREDICT_STAGE, PRETRAIN_STAGE, read_timings
from medhpm.runtime.files import atomic_write_text, check_writable, run_folder_lock, save_config
from medhpm.runtime.logging import read_metrics
from medhpm.segment.probe import run_noise_floor, run_probe
from medhpm.viz.report import curve_figure, grid_figure

ALL_METHODS = ("scratch", "unet", "imagenet") + METHODS  # METHODS: the pre-training methods
LABELS = {"unet": "U-Net (DynUNet)", "scratch": "UNETR", "imagenet": "UNETR+ImageNet", "mae": "UNETR+MAE",
          "no_lpred": "UNETR+HPM w/o L_pred, learn to mask", "no_learn_to_mask": "UNETR+HPM w/o learn to mask",
          "hpm": "UNETR+HPM"}
_KEYS = {"name", "base", "overrides", "methods", "seeds", "imagenet_weights", "description", "grid", "probe",
         "variants", "pairs", "pretrain_seeds", "finetune_from"}
_VARIANT_KEYS = {"method", "overrides", "label"}
# paired differences A - B reported when both methods ran
PAIRS = (("hpm", "mae"), ("mae", "scratch"), ("hpm", "scratch"), ("hpm", "no_learn_to_mask"),
         ("no_learn_to_mask", "scratch"))
CONFIDENCE = 0.95
INTERVAL = ("two-sided 95 % Student-t interval of the mean of the paired per-seed differences "
            "(mean ± t(0.975, n-1) · sd / √n over the n seeds both methods ran; evaluate/paired.py)")
# grid keys that pre-training does not read: the runs of all grid values share one pre-training
PRETRAIN_FREE = ("inference.",) + STAGE_ONLY_KEYS["finetune"]
# fine-tuning keys that change the encoder fine-tuning starts from (the probe then runs per grid value)
ENCODER_KEYS = ("finetune.use_teacher", "finetune.allow_partial_init", "finetune.architecture")
# grid keys the runner refuses: the data set is made once per experiment, seeds and methods are axes
_NOT_GRID = ("seed", "pretrain.method", "data.dataset", "data.phantom_", "data.format", "data.split")
LABELLED = "finetune.labelled_cases"


def load_experiment(name_or_path: str) -> dict:
    """An experiment spec (packaged name or YAML path), checked; defaults filled in."""
    spec, where = read_yaml(name_or_path, folder="experiments", what="experiment")
    unknown = set(spec) - _KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where}; allowed: {sorted(_KEYS)}")
    spec.setdefault("name", Path(name_or_path).stem)
    spec.setdefault("overrides", [])
    spec.setdefault("seeds", [0])
    spec.setdefault("probe", True)
    spec["variants"] = _check_variants(spec.get("variants"), where)
    known = ALL_METHODS + tuple(spec["variants"])
    bad = [m for m in spec.get("methods", []) if m not in known]
    if not spec.get("methods") or bad:
        raise ConfigError(f"{where}: 'methods' must list some of {', '.join(known)} (bad: {bad}); a variant "
                          "is defined under 'variants'")
    if len(set(spec["methods"])) != len(spec["methods"]):
        raise ConfigError(f"{where}: 'methods' names a method twice: {spec['methods']}")
    spec["pairs"] = _check_pairs(spec.get("pairs"), spec["methods"], where)
    if "imagenet" in [base_method(spec, m) for m in spec["methods"]] and not spec.get("imagenet_weights"):
        raise ConfigError(f"{where}: method 'imagenet' needs 'imagenet_weights' (a 2D ViT-B/16 checkpoint you supply)")
    if "base" not in spec:
        raise ConfigError(f"{where}: 'base' (the pipeline config, e.g. demo or btcv_paper) is missing")
    if not isinstance(spec["probe"], bool):
        raise ConfigError(f"{where}: 'probe' must be true or false, not {spec['probe']!r}")
    if spec.get("grid") is not None:
        _check_grid(spec, where)
    else:
        spec["grid"] = None
    for name, v in spec["variants"].items():  # every variant's overrides resolve on the base config
        try:
            load_config(spec["base"], list(spec["overrides"]) + list(v["overrides"]))
        except ConfigError as e:
            raise ConfigError(f"{where}: variant {name!r}: {e}") from None
    _check_label_draws(spec, where)
    return spec


def _check_label_draws(spec: dict, where: str) -> None:
    """``pretrain_seeds`` and ``finetune_from``: pre-training seeds apart from the label draws (``seeds``),
    and the snapshot steps to fine-tune from besides the end; each step adds a method ``M@STEP`` per
    pre-training method ``M`` (a variant of it that fine-tunes from that snapshot of M's pre-training)."""
    seeds, frm = spec.get("pretrain_seeds"), spec.get("finetune_from")
    if seeds is None:
        if frm is not None:
            raise ConfigError(f"{where}: 'finetune_from' needs 'pretrain_seeds' (snapshots are taken from the one "
                              "pre-training of each method and pre-training seed)")
        spec["pretrain_seeds"], spec["finetune_from"] = None, ["last"]
        return
    if (not isinstance(seeds, list) or not seeds or len(set(map(str, seeds))) != len(seeds)
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
        raise ConfigError(f"{where}: 'pretrain_seeds' must be a non-empty list of distinct integers, got {seeds!r}")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in spec["seeds"]):
        raise ConfigError(f"{where}: with 'pretrain_seeds', 'seeds' (the label draws) must be integers, got {spec['seeds']!r}")
    if spec["grid"] is not None and not shares_pretraining(spec):
        raise ConfigError(f"{where}: with 'pretrain_seeds' every run fine-tunes from one pre-training per method and "
                          f"pre-training seed, so the grid key must be one pre-training does not read "
                          f"(finetune.*, inference.*), not {spec['grid']['key']!r}")
    pretrained = [m for m in spec["methods"] if base_method(spec, m) in METHODS]
    if not pretrained:
        raise ConfigError(f"{where}: 'pretrain_seeds' is given but no method in 'methods' pre-trains")
    frm = ["last"] if frm is None else frm
    if not isinstance(frm, list) or not frm or len(set(map(str, frm))) != len(frm) or not all(
            f == "last" or (isinstance(f, int) and not isinstance(f, bool)) for f in frm):
        raise ConfigError(f"{where}: 'finetune_from' must list 'last' and/or snapshot steps (integers), once each, "
                          f"got {frm!r}")
    if "last" not in frm:
        raise ConfigError(f"{where}: 'finetune_from' must include 'last' (the end of the pre-training), got {frm!r}")
    steps = [f for f in frm if f != "last"]
    variants = dict(spec["variants"])
    methods = []
    for m in spec["methods"]:
        methods.append(m)
        if m not in pretrained:
            continue
        cfg = load_config(spec["base"], list(spec["overrides"]) + list(spec["variants"].get(m, {}).get("overrides", [])))
        missing = [f for f in steps if f not in cfg.pretrain.snapshot_steps]
        if missing:
            raise ConfigError(f"{where}: 'finetune_from' steps {missing} are not in {m}'s pretrain.snapshot_steps "
                              f"{list(cfg.pretrain.snapshot_steps)}: a run can only fine-tune from a snapshot taken")
        for f in steps:
            name = f"{m}@{f}"
            variants[name] = {"method": base_method(spec, m), "overrides": list(spec["variants"].get(m, {}).get("overrides", [])),
                              "label": f"{method_label(spec, m)} at step {f}", "from_step": f, "pretrained_as": m}
            methods.append(name)
    spec["variants"], spec["methods"], spec["finetune_from"] = variants, methods, frm


def label_draws(spec: dict) -> bool:
    """Whether ``spec`` pre-trains once per (method, pre-training seed) and fine-tunes per label draw."""
    return bool(spec.get("pretrain_seeds"))


def pretrained_as(spec: dict, name: str) -> str:
    """The method whose pre-training ``name`` fine-tunes from (``mae@300`` -> ``mae``; else ``name``)."""
    return spec.get("variants", {}).get(name, {}).get("pretrained_as", name)


def _check_variants(variants, where: str) -> dict:
    """``variants`` of a spec: NAME -> {method: one of ALL_METHODS, overrides: [key=value, ...], label}."""
    if variants is None:
        return {}
    if not isinstance(variants, dict):
        raise ConfigError(f"{where}: 'variants' must map names to {{method: ..., overrides: [...]}}, got {variants!r}")
    out = {}
    for name, v in variants.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_]+", name) or name in ALL_METHODS:
            raise ConfigError(f"{where}: variant name {name!r} must be a new name (not one of {', '.join(ALL_METHODS)}) "
                              "of letters, digits and '_' (it names folders and the pairs A-B)")
        if not isinstance(v, dict) or set(v) - _VARIANT_KEYS or v.get("method") not in ALL_METHODS:
            raise ConfigError(f"{where}: variant {name!r} must be {{method: one of {', '.join(ALL_METHODS)}, overrides: "
                              f"[key=value, ...], label: text}}, got {v!r}")
        ov = v.get("overrides", [])
        if not isinstance(ov, list) or not all(isinstance(o, str) and "=" in o for o in ov):
            raise ConfigError(f"{where}: variant {name!r}: 'overrides' must be a list of key=value, got {ov!r}")
        if any(o.split("=", 1)[0].strip() in ("pretrain.method", "seed", "method") for o in ov):
            raise ConfigError(f"{where}: variant {name!r}: its method is 'method: ...' and seeds are the "
                              "experiment's; they cannot be overridden")
        out[name] = {"method": v["method"], "overrides": list(ov),
                     "label": str(v.get("label") or f"{LABELS[v['method']]} ({name})")}
    return out


def _check_pairs(pairs, methods: list[str], where: str) -> list[tuple[str, str]]:
    if pairs is None:
        return []
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise ConfigError(f"{where}: 'pairs' must be a list of [A, B] method names, got {pairs!r}")
    bad = [m for p in pairs for m in p if m not in methods]
    if bad:
        raise ConfigError(f"{where}: 'pairs' names {bad}, which 'methods' does not list")
    return [(a, b) for a, b in pairs]


def base_method(spec: dict, name: str) -> str:
    """The built-in method (one of :data:`ALL_METHODS`) a method name of ``spec`` runs."""
    v = spec.get("variants", {}).get(name)
    return v["method"] if v else name


def method_label(spec: dict, name: str) -> str:
    v = spec.get("variants", {}).get(name)
    return v["label"] if v else LABELS[name]


def pairs_of(spec: dict) -> list[tuple[str, str]]:
    """Paired differences A - B of ``spec``: :data:`PAIRS`, each variant against its method (and, for a
    pre-training variant, against scratch and mae), and the spec's own ``pairs``; each once."""
    out = list(PAIRS)
    for name, v in spec.get("variants", {}).items():
        if "from_step" in v:  # a snapshot of a pre-training: against its end and against scratch
            out += [(name, v["pretrained_as"]), (name, "scratch")]
            continue
        out.append((name, v["method"]))
        if v["method"] in METHODS:
            out += [(name, "scratch"), (name, "mae")]
    out += list(spec.get("pairs", []))
    return [p for p in dict.fromkeys(out) if p[0] != p[1]]


def _check_grid(spec: dict, where: str) -> None:
    grid = spec["grid"]
    if not isinstance(grid, dict) or set(grid) != {"key", "values"}:
        raise ConfigError(f"{where}: 'grid' must be a mapping with 'key' (a config key, e.g. {LABELLED}) and "
                          f"'values' (a list), got {grid!r}")
    key, values = grid["key"], grid["values"]
    if not isinstance(key, str) or not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: grid 'key' must be a config key and 'values' a non-empty list, got "
                          f"key={key!r}, values={values!r}")
    if key == "seed" or key.startswith(_NOT_GRID[1:]):
        raise ConfigError(f"{where}: grid key {key!r} cannot be a grid axis (seeds and methods have their own "
                          f"lists; the data set is made once per experiment)")
    names = [_value_name(v) for v in values]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: grid values {values!r} repeat a value")
    cfg = load_config(spec["base"], list(spec["overrides"]))
    try:
        leaf = get_key(cfg, key)
    except AttributeError:  # load_config below says why (an unknown key, with a suggestion)
        leaf = _MISSING
    if hasattr(leaf, "__dataclass_fields__"):
        raise ConfigError(f"{where}: grid key {key!r} is a config section, not a key (e.g. {LABELLED})")
    for v in values:
        try:
            load_config(spec["base"], list(spec["overrides"]) + [_override(key, v)])
        except ConfigError as e:
            raise ConfigError(f"{where}: grid value {key}={v!r}: {e}") from None
    if leaf is _MISSING:
        raise ConfigError(f"{where}: grid key {key!r} is not a config key (e.g. {LABELLED}, finetune.epochs)")


_MISSING = object()


def _override(key: str, value) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def _value_name(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text.replace("/", "_")


def run_experiment(config: str, out: str | Path | None = None, overrides: list[str] | None = None) -> Path:
    spec = load_experiment(config)
    out = Path(out or Path("runs") / f"experiment-{spec['name']}")
    check_writable(out)
    with run_folder_lock(out, what="experiment"):  # one experiment per folder; each run locks its own
        return _run_experiment(spec, out, overrides)


def _cells(spec: dict, overrides: list[str] | None) -> list[dict]:
    """One cell per grid value (one without a grid): its value, folder name and resolved config."""
    base_ov = list(spec["overrides"]) + list(overrides or [])
    grid = spec.get("grid")
    if not grid:
        return [{"value": None, "name": None, "cfg": load_config(spec["base"], base_ov), "overrides": base_ov}]
    return [{"value": v, "name": f"{grid['key']}={_value_name(v)}", "overrides": base_ov + [_override(grid["key"], v)],
             "cfg": load_config(spec["base"], base_ov + [_override(grid["key"], v)])} for v in grid["values"]]


def _method_cfg(spec: dict, cell: dict, name: str):
    """The config a method of ``spec`` runs with in ``cell``: the cell's, then a variant's own overrides."""
    v = spec.get("variants", {}).get(name)
    if not v or not v["overrides"]:
        return cell["cfg"]
    return load_config(spec["base"], cell["overrides"] + v["overrides"])


def shares_pretraining(spec: dict) -> bool:
    """Whether the grid's runs share one pre-training per (method, seed): the key is one pre-training
    does not depend on."""
    grid = spec.get("grid")
    return bool(grid) and grid["key"].startswith(PRETRAIN_FREE)


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
    cells = _cells(spec, overrides)
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
                runs.append({"method": method, "base": base_method(spec, method), "seed": seed, "dir": run_dir,
                             "cell": cell["name"], "value": cell["value"], "pretrain_dir": pt_dir,
                             "cfg": _method_cfg(spec, cell, method)})
    return runs


def planned_pretrainings(spec: dict, out: Path, overrides: list[str] | None = None) -> list[dict]:
    """With ``pretrain_seeds``: the one pre-training of each (pre-training method, pre-training seed), in
    the order they run: its method name, seed, job folder ``OUT/pretrain/METHOD/seedP`` (its
    ``timings.json``), pre-training folder (the job's ``pretrain/``: checkpoints, ``snapshots/``) and the
    config it runs with (the experiment's overrides, then the method's own; seed P)."""
    if not label_draws(spec):
        return []
    cell = _cells(spec, overrides)[0]  # the grid key is one pre-training does not read
    jobs = []
    for p in spec["pretrain_seeds"]:
        for m in spec["methods"]:
            if base_method(spec, m) not in METHODS or pretrained_as(spec, m) != m:
                continue
            job = out / "pretrain" / m / f"seed{p}"
            jobs.append({"method": m, "base": base_method(spec, m), "seed": p, "dir": job, "pt": job / "pretrain",
                         "cfg": replace(_method_cfg(spec, cell, m), seed=int(p))})
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
                    r = {"method": method, "base": base, "seed": f"p{p}d{d}" if several else d, "run_seed": d,
                         "cell": cell["name"], "value": cell["value"], "pretrain_dir": None, "pretrain_job": None,
                         "init": None, "cfg": _method_cfg(spec, cell, method)}
                    if base in METHODS:
                        job = out / "pretrain" / pretrained_as(spec, method) / f"seed{p}"
                        step = spec["variants"].get(method, {}).get("from_step")
                        r.update(pretrain_job=job, pretrain_dir=job / "pretrain",
                                 init=job / "pretrain" / (f"snapshots/encoder_step{step:07d}.safetensors" if step
                                                          else "encoder.safetensors"),
                                 dir=where / method / (f"pretrain_seed{p}" if several else "") / f"seed{d}")
                    else:
                        r["dir"] = where / method / f"seed{d}"
                    runs.append(r)
    return runs


class _Remaining:
    """Progress and the time left of a list of jobs, from the mean of those that ran in this call."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.took, self.t0 = total, what, [], time.time()

    def line(self, i: int, label: str, state: str) -> str:
        left = self.total - i
        eta = (f"about {left * statistics.mean(self.took) / 60:.0f} min left for the {left} {self.what} to go "
               f"({statistics.mean(self.took) / 60:.1f} min each so far)" if self.took and left
               else "time left: known once one has run" if left else "the last one")
        return (f"\n##### [{i + 1}/{self.total}] {label}: {state} ({(time.time() - self.t0) / 60:.1f} min so far; "
                f"{eta}) #####")

    def ran(self, seconds: float) -> None:
        self.took.append(seconds)


def _run_pretrainings(jobs: list[dict], dataset: Path, after=None) -> None:
    """Each pre-training job in its own process (``python -m medhpm.pipeline --pretrain-only``): skipped when
    finished, resumed from ``last.pt`` when interrupted. ``after(job)`` runs after each (its probes: an
    interrupted experiment keeps the curves of the pre-trainings it finished)."""
    eta = _Remaining(len(jobs), "pre-trainings")
    for i, j in enumerate(jobs):
        done = (j["pt"] / "final.pt").exists() and (j["pt"] / "encoder.safetensors").exists()
        print(eta.line(i, f"pre-training {j['method']}, pre-training seed {j['seed']}",
                       "done, skipped" if done else "running"), flush=True)
        if not done:
            t0 = time.time()
            _pretrain_job(j, dataset)
            eta.ran(time.time() - t0)
        if after is not None:
            after(j)


def _pretrain_job(j: dict, dataset: Path) -> None:
    j["dir"].mkdir(parents=True, exist_ok=True)
    save_config(j["cfg"], j["dir"] / "config.yaml")
    rc = subprocess.call([sys.executable, "-m", "medhpm.pipeline", "--config", str(j["dir"] / "config.yaml"),
                          "--dataset", str(dataset), "--out", str(j["dir"]), "--pretrain", j["base"],
                          "--pretrain-only"])
    if rc != 0:
        raise RuntimeError(f"pre-training {j['method']} seed {j['seed']} failed (exit {rc}); rerun the same "
                           "command to resume it")


def _run_experiment(spec: dict, out: Path, overrides: list[str] | None) -> Path:
    cells = _cells(spec, overrides)
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
    _run_pretrainings(jobs, dataset, after=(lambda j: _run_probe_curve(spec, cells, [j], dataset, out))
                      if spec["probe"] else None)
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
        reuse = (" (pre-trained once, shared by the grid: "
                 f"{'reusing' if (pt_dir / 'final.pt').exists() else 'making'} {pt_dir})") if shared and pt_dir and not draws else ""
        frm = f" (fine-tuning from {r['init']})" if draws and r.get("init") else ""
        seed = f"label draw {r['run_seed']}" if draws else f"seed {r['seed']}"
        print(eta.line(len(seen) - 1, f"{r['method']}, {seed}{at}", "done, skipped" if done else "running" + reuse + frm),
              flush=True)
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
    cmd = [sys.executable, "-m", "medhpm.pipeline", "--config", str(run_dir / "config.yaml"),
           "--dataset", str(dataset), "--out", str(run_dir), "--name", name]
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
        raise FileNotFoundError(f"run {name} seed {seed}: the encoder it fine-tunes from, {r['init']}, does not "
                                "exist (its pre-training did not write that snapshot)")
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
        mcfg = _method_cfg(spec, cell, r["method"])
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
        probes.append({"method": r["method"], "seed": r["seed"], "cell": r["cell"] if per_cell else None,
                       "path": path, "result": res})
    return probes


PROBES = ("linear_cv", "knn", "linear_fixed")  # the probes of the curve, as run_noise_floor names them


def _probe_scores(res: dict) -> dict:
    return {"linear_fixed": res["balanced_accuracy"], "linear_cv": res["linear_cv"]["balanced_accuracy"],
            "knn": res["knn"]["balanced_accuracy"]}


def _run_probe_curve(spec: dict, cells: list[dict], jobs: list[dict], dataset: Path, out: Path) -> dict:
    """With ``pretrain_seeds``: the frozen-encoder probes at every snapshot (and the end) of every
    pre-training, and their noise floor over the random initialisations fine-tuning from scratch starts
    from (one per label draw). Every probe learns from ALL training cases (the instrument, not the
    label-scarce setting) with the same folds (seeded with the first label draw), so the encoders are
    compared on equal terms; files under ``OUT/probe/``. Returns ``{"floor": ..., "methods": {M: {P:
    {"steps": [...], PROBE: [...], "loss_rec": [[step, loss], ...]}}}, "final_steps": ...}``."""
    seed0 = int(spec["seeds"][0])
    cell = cells[0]
    base_cfg = replace(cell["cfg"], seed=seed0)
    floor_path = out / "probe" / "noise_floor.json"
    if not floor_path.exists():
        print(f"[probe] the noise floor: random initialisations {spec['seeds']} -> {floor_path}", flush=True)
    floor = run_noise_floor(base_cfg, dataset, floor_path, seeds=[int(x) for x in spec["seeds"]], labelled_cases=0)
    curve: dict = {"floor": {k: floor["summary"][k] for k in PROBES}, "floor_file": str(floor_path.relative_to(out)),
                   "cases_seed": seed0, "training_cases": len(floor["training_cases"]),
                   "test_cases": len(floor["test_cases"]), "methods": {}, "seconds": float(floor.get("seconds") or 0)}
    for j in jobs:
        pt = j["pt"]
        final = _summary_steps(pt)
        points = [(s_, pt / "snapshots" / f"encoder_step{s_:07d}.safetensors") for s_ in j["cfg"].pretrain.snapshot_steps
                  if final is None or s_ <= final]
        if final is not None and final not in j["cfg"].pretrain.snapshot_steps:
            points.append((final, pt / "encoder.safetensors"))
        e = {"steps": [], **{k: [] for k in PROBES}, "files": [], "loss_rec": _loss_curve(pt)}
        for step, enc in points:
            path = out / "probe" / j["method"] / f"seed{j['seed']}" / f"step{step:07d}.json"
            if not path.exists():
                print(f"[probe] {j['method']}, pre-training seed {j['seed']}, step {step}: {enc} -> {path}", flush=True)
            res = run_probe(replace(j["cfg"], seed=seed0), dataset, path, init=enc, labelled_cases=0)
            e["steps"].append(step)
            e["files"].append(str(path.relative_to(out)))
            for k, v in _probe_scores(res).items():
                e[k].append(v)
            curve["seconds"] += float(res.get("seconds") or 0)
        curve["methods"].setdefault(j["method"], {})[j["seed"]] = e
    return curve


def _loss_curve(pt: Path) -> list[list[float]]:
    """``[[optimizer step, mean training reconstruction loss of the epoch ending there], ...]`` of a
    pre-training (its ``metrics.jsonl`` epoch records)."""
    epochs = {r["epoch"]: r for r in read_metrics(pt / "metrics.jsonl")  # a resumed epoch: its last record
              if r.get("kind") == "epoch" and "loss_rec" in r and "epoch" in r}
    out, step = [], 0
    for e in sorted(epochs):
        step += int(epochs[e].get("steps") or 0)
        out.append([step, float(epochs[e]["loss_rec"])])
    return out


def _pretrain_cost(pt: Path) -> dict | None:
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


def _summary_steps(folder: Path) -> int | None:
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
        e = methods.setdefault(r["method"], {"pretrain_steps": [], "finetune_steps": [], "pretrain_s": [],
                                             "finetune_s": [], "predict_evaluate_s": [], "runs": 0})
        e["runs"] += 1
        pt = r.get("pretrain_dir") or r["dir"] / "pretrain"
        base = base_method(spec, r["method"])
        if base in METHODS and pt not in seen_pt:
            seen_pt.add(pt)
            steps = _summary_steps(pt)
            if steps is not None:
                e["pretrain_steps"].append(steps)
            if r.get("pretrain_job"):  # a pre-training run as a job of its own (pretrain_seeds)
                pre = _read_times(r["pretrain_job"]).get(PRETRAIN_STAGE.format(method=base))
                if pre is not None:
                    e["pretrain_s"].append(pre)
                    total += pre
        steps = _summary_steps(r["dir"] / "finetune")
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
    return {"methods": methods, "stage_seconds": total, "probe_seconds": probe_s, "runs": len(seen_run),
            "timed_runs": timed}


def _budget_md(spec: dict, budget: dict) -> str:
    def steps(v):
        return "n/a" if not v else (f"{v[0]}" if min(v) == max(v) else f"{min(v)}-{max(v)}")

    def mean_sd(v, scale):
        if not v:
            return "n/a"
        m, sd, _ = mean_std([x / scale for x in v])
        return f"{m:.1f} ± {sd if math.isfinite(sd) else 0:.1f}" if len(v) > 1 else f"{m:.1f}"

    lines = ["| method | pre-training steps | fine-tuning steps | pre-training (min) | fine-tuning (min) | "
             "prediction + evaluation (s) | runs |", "|---|---|---|---|---|---|---|"]
    for m, e in budget["methods"].items():
        pre = base_method(spec, m) in METHODS
        lines.append(f"| {method_label(spec, m)} | {steps(e['pretrain_steps']) if pre else '-'} | "
                     f"{steps(e['finetune_steps'])} | {mean_sd(e['pretrain_s'], 60) if pre else '-'} | "
                     f"{mean_sd(e['finetune_s'], 60)} | {mean_sd(e['predict_evaluate_s'], 1)} | {e['runs']} |")
    untimed = budget["runs"] - budget["timed_runs"]
    probes = (f", and the frozen-encoder probes {budget['probe_seconds'] / 60:.1f} min"
              if budget.get("probe_seconds") else "")
    note = (f"Wall time per run, mean ± std over the runs that ran the stage (each run's `timings.json`). "
            f"All stages of the {budget['timed_runs']} timed runs: **{budget['stage_seconds'] / 60:.1f} min**"
            f"{probes}; a pre-training shared by a grid's runs counts once; the start-up of each run's process "
            "is not included.")
    if untimed:
        note += f" {untimed} run(s) were made before runs recorded their times and are not counted."
    return "\n".join(lines) + "\n\n" + note + "\n"


def _paired(per_seed: dict[str, dict], methods: list[str], pairs) -> dict:
    """``{"A-B": paired_difference(...)}`` for the ``pairs`` (:func:`pairs_of`) among ``methods``;
    ``per_seed`` maps a method to ``{seed: value}``."""
    return {f"{a}-{b}": paired_difference(per_seed[a], per_seed[b], CONFIDENCE)
            for a, b in pairs if a in methods and b in methods}


def _ms(values) -> dict:
    mean, std, n = mean_std(list(values))
    return {"mean": mean, "std": std, "n": n}


def write_experiment_results(out: Path, spec: dict, cfg, runs: list[dict], probes: list[dict] | None = None,
                             curve: dict | None = None) -> Path:
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
        dice = {m: {s: sm["mean"].get("dice_mean") for s, sm in zip(seeds_of[c][m], per_cell[c][m])} for m in per_cell[c]}
        hd = {m: {s: sm["mean"].get("hd95_mean") for s, sm in zip(seeds_of[c][m], per_cell[c][m])} for m in per_cell[c]}
        dice = {m: {s: math.nan if v is None else float(v) for s, v in d.items()} for m, d in dice.items()}
        hd = {m: {s: math.nan if v is None else float(v) for s, v in d.items()} for m, d in hd.items()}
        cells_out.append({
            "name": c, "value": values[c],
            "methods": {m: {"dice": {**_ms(dice[m].values()), "seeds": dice[m]},
                            "hd95": {**_ms(hd[m].values()), "seeds": hd[m]}} for m in per_cell[c]},
            "paired": {"dice": _paired(dice, list(per_cell[c]), pairs_of(spec)),
                       "hd95": _paired(hd, list(per_cell[c]), pairs_of(spec))},
            "aggregate": {m: aggregate_seeds(s) for m, s in per_cell[c].items()},
        })
    probe_out = _probe_summary(spec, probes, out)
    figure = None
    if grid:
        series = {method_label(spec, m): [(cell["value"], 100 * cell["methods"][m]["dice"]["mean"],
                               100 * cell["methods"][m]["dice"]["std"]) for cell in cells_out if m in cell["methods"]]
                  for m in methods}
        figure = grid_figure(series, out / f"dice_vs_{_value_name(grid['key'])}.png", xlabel=grid["key"],
                             title=f"{spec['name']}: mean ± std over seeds {spec['seeds']}")
    budget = _budget(spec, runs, probes)
    curve_md = ""
    if curve:
        budget["probe_seconds"] += curve["seconds"]
        probe_out = _curve_as_probe(spec, curve)
        curve_md = _curve_md(spec, curve, curve_figure(
            {method_label(spec, m): e for m, e in curve["methods"].items()}, curve["floor"],
            out / "probe_vs_pretraining_steps.png", PROBES[:2],
            title=f"{spec['name']}: frozen-encoder probes on {curve['test_cases']} test cases"))
    md = _results_md(spec, cfg, classes, cells_out, probe_out, costs, figure, out, curve_md) + \
        f"\n## Budget and wall time\n\n{_budget_md(spec, budget)}"
    atomic_write_text(out / "results.md", md)
    payload = {"spec": spec, "interval": INTERVAL, "confidence": CONFIDENCE, "grid": grid,
               "cells": cells_out, "probe": probe_out, "probe_curve": curve,
               "pretrain_cost": costs, "budget": budget, "figure": figure.name if figure else None}
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
        cell = summary["cells"].setdefault(p["cell"] or "all", {"methods": {}, "labelled_cases": p["result"]["labelled_cases"]})
        e = cell["methods"].setdefault(p["method"], {"seeds": {}, "chance": {}, "files": {}})
        e["seeds"][p["seed"]] = p["result"]["balanced_accuracy"]
        e["chance"][p["seed"]] = p["result"]["chance"]
        e["files"][p["seed"]] = str(p["path"].relative_to(out))
    for cell in summary["cells"].values():
        for e in cell["methods"].values():
            e.update(_ms(e["seeds"].values()))
        cell["paired"] = _paired({m: e["seeds"] for m, e in cell["methods"].items()}, list(cell["methods"]),
                                 pairs_of(spec))
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
            vals = [e["linear_cv"][e["steps"].index(step) if step else -1]
                    for e in curve["methods"][src].values() if e["steps"] and (not step or step in e["steps"])]
            if vals:
                methods[m] = _ms(vals)
        elif base == "scratch":
            f = curve["floor"]["linear_cv"]
            methods[m] = {"mean": f["mean"], "std": f["std"], "n": f["n"]}
    return {"metric": "balanced accuracy of the cross-validated linear probe (all training cases)",
            "cells": {"all": {"methods": methods}}, "from_curve": True}


def _curve_md(spec: dict, curve: dict, figure: Path) -> str:
    names = {"linear_cv": "cross-validated linear probe", "knn": "kNN probe", "linear_fixed": "fixed linear probe (L2 1e-3)"}
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
        "loss of each epoch.\n"]
    for k in PROBES:
        f = floor[k]
        steps = sorted({s_ for m in curve["methods"].values() for e in m.values() for s_ in e["steps"]})
        lines = ["| method (pre-training seed) | " + " | ".join(f"step {s_}" for s_ in steps) + " |",
                 "|---|" + "---|" * len(steps)]
        lines.append("| random initialisation (noise floor) | " + " | ".join(
            [f"{100 * f['mean']:.1f} ± {100 * (f['std'] if math.isfinite(f['std']) else 0):.1f} "
             f"[{100 * f['min']:.1f}, {100 * f['max']:.1f}]"] * len(steps)) + " |")
        for m, seeds in curve["methods"].items():
            for p, e in seeds.items():
                at = dict(zip(e["steps"], e[k]))
                lines.append(f"| {method_label(spec, m)} ({p}) | " + " | ".join(
                    f"{100 * at[s_]:.1f}" + ("*" if at[s_] > f["max"] else "") if s_ in at else "-" for s_ in steps) + " |")
        parts.append(f"### {names[k]}\n\n" + "\n".join(lines) + "\n\n`*`: above the noise floor's max.\n")
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
    parts = [f"# Experiment {spec['name']}\n\nBase config `{spec['base']}` with overrides "
             f"{list(spec['overrides']) + list(spec.get('command_line_overrides', []))}; "
             f"seeds {spec['seeds']} (cells: mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''})"
             + (f"; grid over `{key}`: {grid['values']}" + (
                 " (each (method, seed) pre-trained once; every grid value fine-tunes from that encoder)"
                 if shares_pretraining(spec) else " (each grid value pre-trains anew)") if grid else "") + ".\n"]
    # summary: mean Dice and HD95 per method (and grid value), probe beside
    head = (f"| {key} | " if grid else "| ") + "method | DSC (%) | HD95 (mm) | probe bal. acc. (%) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in cells:
        pc = (probe or {}).get("cells", {})
        pcell = pc.get(c["name"]) or pc.get("all")
        for m, e in c["methods"].items():
            pe = (pcell or {}).get("methods", {}).get(m)
            pr = _pm(100 * pe["mean"], 100 * pe["std"] if math.isfinite(pe["std"]) else 0, 1) if pe else "n/a"
            lines.append(("| " + _value_name(c["value"]) + " " if grid else "") + f"| {method_label(spec, m)} | "
                         f"{_pm(100 * e['dice']['mean'], 100 * e['dice']['std'] if math.isfinite(e['dice']['std']) else 0, 2)} | "
                         f"{_pm(e['hd95']['mean'], e['hd95']['std'] if math.isfinite(e['hd95']['std']) else 0, 2)} | {pr} |")
    parts.append("## Mean Dice over the reported organs, HD95, and the frozen-encoder probe\n\n" + "\n".join(lines) + "\n")
    if figure:
        parts.append(f"![mean Dice against {key}]({figure.name})\n\n[{figure.name}]({figure.name}): mean Dice "
                     "against the grid value per method, error bars ± one std over seeds.\n")
    # paired differences
    plines = [(f"| {key} | " if grid else "| ") + "A - B | ΔDSC (points) [95 % CI] | ΔHD95 (mm) [95 % CI] | seeds |"]
    plines.append("|" + "---|" * (plines[0].count("|") - 1))
    for c in cells:
        for pair, d in c["paired"]["dice"].items():
            h = c["paired"]["hd95"][pair]
            plines.append(("| " + _value_name(c["value"]) + " " if grid else "") +
                          f"| {pair} | {_ci(d, 100, 2)} | {_ci(h, 1, 2)} | {d['n']} |")
    if len(plines) > 2:
        parts.append("## Paired differences over seeds\n\nA - B per seed (runs with the same seed share the "
                     "validation split, the labelled cases and the data order), then the mean and its " + INTERVAL
                     + ". ΔDSC > 0: A segments better; ΔHD95 < 0: A's boundaries are closer. With 3 to 5 seeds "
                     "read the interval as the width the seeds allow, not as a test.\n\n" + "\n".join(plines) + "\n")
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
                pl.append(f"| {method_label(spec, m)}{tag} | {_pm(100 * e['mean'], 100 * e['std'] if math.isfinite(e['std']) else 0, 1)}"
                          f" | {100 * ch:.1f} | {e['n']} |")
            for pair, d in cell["paired"].items():
                ql.append(f"| {pair}{tag} | {_ci(d, 100, 2)} | {d['n']} |")
            k = cell["labelled_cases"]
            texts.append(f"{'all' if not k else k} labelled training case{'s' if k != 1 else ''}{tag}")
        fitted = "; ".join(dict.fromkeys(texts))
        why = (f"the smallest `{LABELLED}` of the grid" if grid and key == LABELLED else
               f"the config's `{LABELLED}` (0: every training case left after the validation split)")
        parts.append(
            "## Frozen-encoder probe\n\nThe encoder UNETR fine-tuning starts from (pre-trained; for `scratch` the "
            "seeded random initialisation of the same ViT), frozen; every token labelled with its patch's majority "
            "class (background included). A class-balanced linear probe is fitted on the tokens of the labelled "
            f"training cases, here {fitted} ({why}, drawn per seed as fine-tuning draws them), and scored on the "
            "test cases by balanced accuracy (the mean over the classes present of the share predicted right). "
            + ("One probe per (method, seed): the grid key does not change the encoder. " if shares_pretraining(spec)
               and not key.startswith(ENCODER_KEYS) else "")
            + "Files: `probe.json` beside each run"
            + (" (`probe/METHOD/seedS/probe.json`)" if shares_pretraining(spec) and not key.startswith(ENCODER_KEYS) else "")
            + ".\n\n" + "\n".join(pl) + "\n\n" + ("\n".join(ql) + "\n" if len(ql) > 2 else ""))
    # Table 1 and Table 3, per grid value
    for c in cells:
        tag = f" ({c['name']})" if c["name"] else ""
        rows = {method_label(spec, m): a for m, a in c["aggregate"].items()}
        parts.append(f"## Table 1 style{tag}: per organ (DSC %) and average DSC / HD95 (mm)\n\n{paper_table(rows, classes)}")
        ablation = [m for m in ("no_lpred", "no_learn_to_mask", "hpm") if m in c["aggregate"]]
        if not grid or len(ablation) > 1:  # with a grid only when there is an ablation to show
            parts.append(f"## Table 3 style{tag}: ablation\n\n{_table3(c['aggregate'], ablation)}\n")
    parts.append(f"## Pre-training cost\n\n{_cost_table(costs)}\n\nTime per step is the median wall time of an "
                 "optimizer step (data + compute); peak memory is the pre-training process's peak (CUDA: max "
                 "allocated; CPU: max resident set size).\n")
    return "\n".join(parts)


def _table3(agg: dict, ablation: list[str]) -> str:
    lines = ["| components | DSC | HD95 |", "|---|---|---|"]
    names = {"no_lpred": "w/o L_pred, learn to mask", "no_learn_to_mask": "w/o learn to mask", "hpm": "Ours (HPM)"}
    for m in ablation:
        mean = agg[m]["mean"]
        lines.append(f"| {names[m]} | {_pm(mean.get('dice_mean'), mean.get('dice_std'), 3)} | "
                     f"{_pm(mean.get('hd95_mean'), mean.get('hd95_std'), 2)} |")
    return "\n".join(lines)


def _cost_table(costs: dict) -> str:
    cost_lines = ["| method | time per step (s) | time per epoch (s) | peak memory (MiB) | step time vs mae |",
                  "|---|---|---|---|---|"]
    base = statistics.median([c["step_s"] for c in costs["mae"]]) if "mae" in costs else None
    for m, cs in costs.items():
        st = statistics.median([c["step_s"] for c in cs])
        ep = [c["epoch_s"] for c in cs if c["epoch_s"]]
        mem = [c["peak_memory_mib"] for c in cs if c.get("peak_memory_mib")]
        cost_lines.append(f"| {m} | {st:.3f} | {statistics.median(ep) if ep else float('nan'):.1f} | "
                          f"{max(mem) if mem else float('nan'):.0f} | {st / base if base else float('nan'):.2f} |")
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
