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

The package: :mod:`~medhpm.experiment.spec` (the spec and its checks), :mod:`~medhpm.experiment.runner`
(what runs where, and running it), :mod:`~medhpm.experiment.report` (results.md, results.json, figures).
"""

from medhpm.experiment.report import write_experiment_results
from medhpm.experiment.runner import planned_pretrainings, planned_runs, run_command, run_experiment
from medhpm.experiment.spec import (
    ALL_METHODS,
    LABELS,
    PAIRS,
    base_method,
    label_draws,
    load_experiment,
    method_label,
    pairs_of,
    pretrained_as,
    shares_pretraining,
)

__all__ = [
    "ALL_METHODS",
    "LABELS",
    "PAIRS",
    "base_method",
    "label_draws",
    "load_experiment",
    "method_label",
    "pairs_of",
    "planned_pretrainings",
    "planned_runs",
    "pretrained_as",
    "run_command",
    "run_experiment",
    "shares_pretraining",
    "write_experiment_results",
]
