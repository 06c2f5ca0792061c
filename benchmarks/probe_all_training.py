"""The frozen-encoder probe of a finished experiment, fitted on EVERY training case instead of the k labelled ones.

    python -m benchmarks.probe_all_training EXPERIMENT_FOLDER

A probe fitted on one labelled phantom's few hundred tokens memorises them (training balanced accuracy
about 1.0), so its test score says more about that case than about the encoder. This refits it, per
(method, seed) of the experiment, on the tokens of all training cases left after the validation split
(``finetune.labelled_cases=0``), with the encoders the experiment pre-trained (scratch: the seeded random
init), and writes ``EXPERIMENT_FOLDER/probe_all_training/`` (one ``probe.json`` per run and ``summary.json``
with mean ± std per method and the paired differences with their 95 % Student-t interval).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from medhpm.config import METHODS, load_config
from medhpm.evaluate.paired import paired_difference
from medhpm.evaluate.tables import mean_std
from medhpm.segment.encoder_probe import run_probe


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit(__doc__)
    out = Path(argv[0])
    spec = json.loads((out / "experiment.json").read_text())
    cfg = load_config(spec["base"], list(spec["overrides"]) + list(spec.get("command_line_overrides", [])))
    dataset = out / "phantom" / "dataset.json" if cfg.data.dataset == "phantom" else Path(cfg.data.dataset)
    methods = [m for m in spec["methods"] if m == "scratch" or m in METHODS]
    acc: dict[str, dict[int, float]] = {}
    for m in methods:
        for s in spec["seeds"]:
            init = None if m == "scratch" else out / "pretrain" / m / f"seed{s}" / "encoder.safetensors"
            r = run_probe(
                replace(cfg, seed=int(s)),
                dataset,
                out / "probe_all_training" / m / f"seed{s}" / "probe.json",
                init=init,
                labelled_cases=0,
            )
            acc.setdefault(m, {})[int(s)] = r["balanced_accuracy"]
            print(
                f"{m} seed {s}: balanced accuracy {100 * r['balanced_accuracy']:.1f} % "
                f"(training {100 * r['train_balanced_accuracy']:.1f} % on {r['train_tokens']} tokens)",
                flush=True,
            )
    pairs = [(a, b) for a, b in (("hpm", "mae"), ("mae", "scratch"), ("hpm", "scratch")) if a in acc and b in acc]
    summary = {
        "per_seed": acc,
        "mean_std": {m: dict(zip(("mean", "std", "n"), mean_std(list(v.values())))) for m, v in acc.items()},
        "paired": {f"{a}-{b}": paired_difference(acc[a], acc[b]) for a, b in pairs},
    }
    (out / "probe_all_training" / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    for k, v in summary["paired"].items():
        print(f"{k}: {100 * v['mean']:+.2f} points [{100 * v['lo']:+.2f}, {100 * v['hi']:+.2f}]")
    return summary


if __name__ == "__main__":
    main()
