"""The experiment spec: what ``medhpm experiment --config NAME|PATH`` reads, checked before any run.

Methods, variants (a method with overrides of its own), pairs, the grid over one config key, and the
pre-training seeds apart from the label draws (``pretrain_seeds``, ``finetune_from``); every error names the
spec file. :func:`load_experiment` returns the spec with its defaults filled in; the helpers here answer what
a method name of a spec runs (:func:`base_method`, :func:`pretrained_as`), its row name, its pairs, and the
resolved config of each grid cell (:func:`cells`, :func:`method_cfg`). See docs/experiments.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from medhpm.config import METHODS, STAGE_ONLY_KEYS, ConfigError, get_key, load_config, read_yaml


ALL_METHODS = ("scratch", "unet", "imagenet") + METHODS  # METHODS: the pre-training methods


LABELS = {
    "unet": "U-Net (DynUNet)",
    "scratch": "UNETR",
    "imagenet": "UNETR+ImageNet",
    "mae": "UNETR+MAE",
    "no_lpred": "UNETR+HPM w/o L_pred, learn to mask",
    "no_learn_to_mask": "UNETR+HPM w/o learn to mask",
    "hpm": "UNETR+HPM",
}


_KEYS = {
    "name",
    "base",
    "overrides",
    "methods",
    "seeds",
    "imagenet_weights",
    "description",
    "grid",
    "probe",
    "variants",
    "pairs",
    "pretrain_seeds",
    "finetune_from",
}


_VARIANT_KEYS = {"method", "overrides", "label"}


# paired differences A - B reported when both methods ran
PAIRS = (
    ("hpm", "mae"),
    ("mae", "scratch"),
    ("hpm", "scratch"),
    ("hpm", "no_learn_to_mask"),
    ("no_learn_to_mask", "scratch"),
)


CONFIDENCE = 0.95


INTERVAL = (
    "two-sided 95 % Student-t interval of the mean of the paired per-seed differences "
    "(mean ± t(0.975, n-1) · sd / √n over the n seeds both methods ran; evaluate/paired.py)"
)


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
        raise ConfigError(
            f"{where}: 'methods' must list some of {', '.join(known)} (bad: {bad}); a variant "
            "is defined under 'variants'"
        )
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
            raise ConfigError(
                f"{where}: 'finetune_from' needs 'pretrain_seeds' (snapshots are taken from the one "
                "pre-training of each method and pre-training seed)"
            )
        spec["pretrain_seeds"], spec["finetune_from"] = None, ["last"]
        return
    if (
        not isinstance(seeds, list)
        or not seeds
        or len(set(map(str, seeds))) != len(seeds)
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)
    ):
        raise ConfigError(f"{where}: 'pretrain_seeds' must be a non-empty list of distinct integers, got {seeds!r}")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in spec["seeds"]):
        raise ConfigError(
            f"{where}: with 'pretrain_seeds', 'seeds' (the label draws) must be integers, got {spec['seeds']!r}"
        )
    if spec["grid"] is not None and not shares_pretraining(spec):
        raise ConfigError(
            f"{where}: with 'pretrain_seeds' every run fine-tunes from one pre-training per method and "
            f"pre-training seed, so the grid key must be one pre-training does not read "
            f"(finetune.*, inference.*), not {spec['grid']['key']!r}"
        )
    pretrained = [m for m in spec["methods"] if base_method(spec, m) in METHODS]
    if not pretrained:
        raise ConfigError(f"{where}: 'pretrain_seeds' is given but no method in 'methods' pre-trains")
    frm = ["last"] if frm is None else frm
    if (
        not isinstance(frm, list)
        or not frm
        or len(set(map(str, frm))) != len(frm)
        or not all(f == "last" or (isinstance(f, int) and not isinstance(f, bool)) for f in frm)
    ):
        raise ConfigError(
            f"{where}: 'finetune_from' must list 'last' and/or snapshot steps (integers), once each, got {frm!r}"
        )
    if "last" not in frm:
        raise ConfigError(f"{where}: 'finetune_from' must include 'last' (the end of the pre-training), got {frm!r}")
    steps = [f for f in frm if f != "last"]
    variants = dict(spec["variants"])
    methods = []
    for m in spec["methods"]:
        methods.append(m)
        if m not in pretrained:
            continue
        cfg = load_config(
            spec["base"], list(spec["overrides"]) + list(spec["variants"].get(m, {}).get("overrides", []))
        )
        missing = [f for f in steps if f not in cfg.pretrain.snapshot_steps]
        if missing:
            raise ConfigError(
                f"{where}: 'finetune_from' steps {missing} are not in {m}'s pretrain.snapshot_steps "
                f"{list(cfg.pretrain.snapshot_steps)}: a run can only fine-tune from a snapshot taken"
            )
        for f in steps:
            name = f"{m}@{f}"
            variants[name] = {
                "method": base_method(spec, m),
                "overrides": list(spec["variants"].get(m, {}).get("overrides", [])),
                "label": f"{method_label(spec, m)} at step {f}",
                "from_step": f,
                "pretrained_as": m,
            }
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
            raise ConfigError(
                f"{where}: variant name {name!r} must be a new name (not one of {', '.join(ALL_METHODS)}) "
                "of letters, digits and '_' (it names folders and the pairs A-B)"
            )
        if not isinstance(v, dict) or set(v) - _VARIANT_KEYS or v.get("method") not in ALL_METHODS:
            raise ConfigError(
                f"{where}: variant {name!r} must be {{method: one of {', '.join(ALL_METHODS)}, overrides: "
                f"[key=value, ...], label: text}}, got {v!r}"
            )
        ov = v.get("overrides", [])
        if not isinstance(ov, list) or not all(isinstance(o, str) and "=" in o for o in ov):
            raise ConfigError(f"{where}: variant {name!r}: 'overrides' must be a list of key=value, got {ov!r}")
        if any(o.split("=", 1)[0].strip() in ("pretrain.method", "seed", "method") for o in ov):
            raise ConfigError(
                f"{where}: variant {name!r}: its method is 'method: ...' and seeds are the "
                "experiment's; they cannot be overridden"
            )
        out[name] = {
            "method": v["method"],
            "overrides": list(ov),
            "label": str(v.get("label") or f"{LABELS[v['method']]} ({name})"),
        }
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
        raise ConfigError(
            f"{where}: 'grid' must be a mapping with 'key' (a config key, e.g. {LABELLED}) and "
            f"'values' (a list), got {grid!r}"
        )
    key, values = grid["key"], grid["values"]
    if not isinstance(key, str) or not isinstance(values, list) or not values:
        raise ConfigError(
            f"{where}: grid 'key' must be a config key and 'values' a non-empty list, got "
            f"key={key!r}, values={values!r}"
        )
    if key == "seed" or key.startswith(_NOT_GRID[1:]):
        raise ConfigError(
            f"{where}: grid key {key!r} cannot be a grid axis (seeds and methods have their own "
            f"lists; the data set is made once per experiment)"
        )
    names = [value_name(v) for v in values]
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


def value_name(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text.replace("/", "_")


def grid_cells(spec: dict, overrides: list[str] | None) -> list[dict]:
    """One cell per grid value (one without a grid): its value, folder name and resolved config."""
    base_ov = list(spec["overrides"]) + list(overrides or [])
    grid = spec.get("grid")
    if not grid:
        return [{"value": None, "name": None, "cfg": load_config(spec["base"], base_ov), "overrides": base_ov}]
    return [
        {
            "value": v,
            "name": f"{grid['key']}={value_name(v)}",
            "overrides": base_ov + [_override(grid["key"], v)],
            "cfg": load_config(spec["base"], base_ov + [_override(grid["key"], v)]),
        }
        for v in grid["values"]
    ]


def method_cfg(spec: dict, cell: dict, name: str):
    """The config a method of ``spec`` runs with in ``cell``: the cell's, then a variant's own overrides."""
    v = spec.get("variants", {}).get(name)
    if not v or not v["overrides"]:
        return cell["cfg"]
    return load_config(spec["base"], cell["overrides"] + v["overrides"])


def shares_pretraining(spec: dict) -> bool:
    """Whether the grid's runs share one pre-training per (method, seed): the key is one pre-training
    does not depend on."""
    grid: Any = spec.get("grid")
    return bool(grid) and grid["key"].startswith(PRETRAIN_FREE)
