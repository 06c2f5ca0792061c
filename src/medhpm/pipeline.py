"""The main job: phantoms -> HPM pre-training -> UNETR fine-tuning -> prediction -> evaluation -> report.

``run_demo`` is what ``medhpm demo`` runs with no data at all; ``run_stages`` is the same chain on any
config. The experiment runner starts one process per method and seed with this module's entry point::

    python -m medhpm.pipeline --config RUN/config.yaml --dataset DATA --out RUN [--pretrain hpm [--pretrain-dir PT] | --init W]
    python -m medhpm.pipeline --config JOB/config.yaml --dataset DATA --out JOB --pretrain hpm --pretrain-only
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from medhpm.config import METHODS, Config, check_resume, load_config, to_dict
from medhpm.data.datalist import load_datalist
from medhpm.data.sources import phantoms_written, resolve_dataset
from medhpm.evaluate.run import evaluate_predictions
from medhpm.pretrain.export import export_encoder
from medhpm.pretrain.trainer import pretrain
from medhpm.runtime.checkpoint import MODEL_ORDER, resolve_checkpoint
from medhpm.runtime.files import atomic_write_text, check_writable, run_folder_lock
from medhpm.segment.predict import Predictor
from medhpm.segment.trainer import finetune
from medhpm.viz.overlay import segmentation_figure_from_files
from medhpm.viz.report import curves_figure, write_report

QUICK_OVERRIDES = [
    "data.phantom_cases=6",
    "pretrain.epochs=2",
    "pretrain.steps_per_epoch=10",
    "finetune.epochs=4",
    "finetune.steps_per_epoch=10",
    "finetune.val_every=2",
]


# the names of run_stages' stages, as timings.json records them (the experiment runner reads them back)
PRETRAIN_STAGE = "self-pre-training ({method})"
FINETUNE_STAGE = "UNETR fine-tuning"
PREDICT_STAGE = "prediction of the test scans"
EVALUATE_STAGE = "evaluation (Dice, HD95)"


class Stages:
    """Runs named stages in order, printing progress and timing each one.

    With a ``record`` file (the demo's ``timings.json``) the times are written there after every stage, so
    that a call cut short keeps what its finished stages took. A stage finished by an earlier call (a resumed
    folder) is :meth:`skip`-ped: it keeps the time the record gives it and is listed in ``kept``."""

    times: dict[str, float]  # stage -> seconds
    kept: list[str]

    def __init__(self, total: int, record: Path | None = None):
        self.total, self.n, self.times, self.kept = total, 0, {}, []
        self.record = record
        self.earlier = read_timings(record) if record is not None else {}

    def write(self) -> None:
        """Write the times to the record file (if any)."""
        if self.record is not None:
            atomic_write_text(self.record, json.dumps(self.times, indent=2))

    def run(self, name: str, fn, *a, **kw):
        self.n += 1
        print(f"\n=== [{self.n}/{self.total}] {name} ===", flush=True)
        t0 = time.time()
        out = fn(*a, **kw)
        self.times[name] = round(time.time() - t0, 1)
        print(f"=== {name}: done in {self.times[name]:.1f} s ===", flush=True)
        self.write()
        return out

    def skip(self, name: str) -> None:
        self.n += 1
        took = self.earlier.get(name)
        if isinstance(took, (int, float)):
            self.times[name] = took
        self.kept.append(name)
        print(
            f"\n=== [{self.n}/{self.total}] {name}: done before"
            + (f" (in {took:.1f} s)" if isinstance(took, (int, float)) else "")
            + ", kept ===",
            flush=True,
        )
        self.write()


def pretrain_stage(cfg: Config, pt: Path, stages: Stages) -> Path:
    """Pre-train with ``cfg.pretrain.method`` into ``pt`` (resumed from ``last.pt``; a finished one is
    reused after :func:`config.check_resume`) and export its encoder; returns ``pt/encoder.safetensors``."""
    name = PRETRAIN_STAGE.format(method=cfg.pretrain.method)
    enc = pt / "encoder.safetensors"
    if not (pt / "final.pt").exists():
        stages.run(name, pretrain, cfg, pt, resume=(pt / "last.pt").exists())
    else:  # reused: made with this method and model (a shared folder may have been made by another run)
        check_resume(cfg, pt, "pretrain")
        stages.skip(name)
    if not enc.exists():
        export_encoder(pt / "final.pt", enc, force=True)  # a sidecar without weights: an export cut short
    return enc


def run_stages(
    cfg: Config,
    out: Path,
    dataset: Path,
    pretrain_method: str | None = None,
    init: str | None = None,
    name: str | None = None,
    stages: Stages | None = None,
    pretrain_dir: str | Path | None = None,
) -> dict:
    """Pre-train (when ``pretrain_method`` is given), fine-tune, predict the test split, evaluate; resumable.

    ``pretrain_method``: one of ``config.METHODS``; fine-tuning then starts from its encoder. Without it,
    fine-tuning starts from ``init`` (weights to load, e.g. an inflated 2D ViT) or, without that too, from
    scratch; both at once is an error. ``name`` is the row name in the evaluation table (default: the
    pre-training method, else ``init`` or ``scratch``). Finished stages are skipped; a stage interrupted
    after its first checkpoint resumes from ``last.pt``.

    ``pretrain_dir``: where the pre-training lives (default ``out/pretrain``); runs that differ only in what
    pre-training does not depend on (fine-tuning and inference keys, e.g. the experiment runner's grid over
    ``finetune.labelled_cases``) share one: the first run pre-trains there, the others fine-tune from its
    encoder. A finished pre-training is reused only if its config agrees in every key its checkpoint
    depends on (``config.check_resume``).
    """
    if pretrain_method is not None and init is not None:
        raise ValueError(
            f"run_stages: fine-tuning starts from the {pretrain_method} pre-training or from init={init!r}, not both"
        )
    if pretrain_dir is not None and pretrain_method is None:
        raise ValueError(f"run_stages: pretrain_dir={str(pretrain_dir)!r} needs a pretrain_method")
    if pretrain_method is not None and pretrain_method not in METHODS:
        raise ValueError(f"run_stages: pretrain_method {pretrain_method!r} is not one of {', '.join(METHODS)}")
    name = name or pretrain_method or ("init" if init else "scratch")
    out = Path(out)
    stages = stages or Stages(4 if pretrain_method else 3)
    cfg = replace(cfg, data=replace(cfg.data, dataset=str(dataset)))
    result: dict = {"method": name, "run": str(out)}
    init = init or "none"
    if pretrain_method:
        cfg = replace(cfg, pretrain=replace(cfg.pretrain, method=pretrain_method))
        pt = Path(pretrain_dir) if pretrain_dir is not None else out / "pretrain"
        init = str(pretrain_stage(cfg, pt, stages))
        result["pretrain"] = str(pt)
    ft = out / "finetune"
    if not (ft / "final.pt").exists():
        stages.run(FINETUNE_STAGE, finetune, cfg, ft, init=init, resume=(ft / "last.pt").exists())
    else:
        stages.skip(FINETUNE_STAGE)
    result["finetune"] = str(ft)
    pred_dir = out / "predictions"
    best = resolve_checkpoint(ft, MODEL_ORDER)  # best.pt: what `medhpm predict -m RUN/finetune` uses too

    def _predict():
        p = Predictor.from_checkpoint(best, device=cfg.runtime.device)
        res = p.predict_path(dataset, pred_dir, split="test")
        bad = [r for r in res if not r["ok"]]
        if bad:
            raise RuntimeError(f"prediction failed for {len(bad)} scans: {bad[0]['input']}: {bad[0]['error']}")
        return res

    if not (out / "evaluation" / "metrics.json").exists():
        stages.run(PREDICT_STAGE, _predict)
        metrics = stages.run(
            EVALUATE_STAGE,
            evaluate_predictions,
            pred_dir,
            dataset,
            cfg.finetune.reported,
            out / "evaluation",
            method=name,
            surface_tolerance_mm=cfg.finetune.surface_tolerance_mm,
        )
    else:
        stages.skip(PREDICT_STAGE)
        stages.skip(EVALUATE_STAGE)
        metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    result["metrics"] = str(out / "evaluation" / "metrics.json")
    result["summary"] = metrics["summary"]
    return result


def run_demo(out: str | Path = "runs/demo", quick: bool = False, overrides: list[str] | None = None) -> Path:
    """Everything on phantoms, no data needed; writes ``out/report.html``."""
    out = Path(out)
    check_writable(out)
    ov = (QUICK_OVERRIDES if quick else []) + list(overrides or [])
    cfg = load_config("demo", ov)
    with run_folder_lock(out, what="demo"):  # one demo per folder (its stages lock their own folders)
        return _run_demo(out, quick, ov, cfg)


def _run_demo(out: Path, quick: bool, ov: list[str], cfg: Config) -> Path:
    _claim_demo_folder(out, quick, ov)
    t_start = time.time()
    stages = Stages(6, record=out / "timings.json")
    if phantoms_written(cfg.data, out):
        dataset = resolve_dataset(cfg.data, out)
        stages.skip("phantom CT data")
    else:
        dataset = stages.run("phantom CT data", resolve_dataset, cfg.data, out)
    res = run_stages(cfg, out, dataset, pretrain_method="hpm", stages=stages)
    stages.run("figures and report", write_demo_report, out, cfg, res, stages.times, quick, stages.kept)
    wall = time.time() - t_start
    # the demo's time: this call's, plus what the stages it found done took when they ran
    total = wall + sum(stages.times.get(k, 0.0) for k in stages.kept)
    stages.times["total"] = round(total, 1)
    stages.write()
    mean = res["summary"]["mean"]
    took = f"{wall / 60:.1f} min" + (
        f" ({len(stages.kept)} stages done before; {total / 60:.1f} min in all)" if stages.kept else ""
    )
    print(
        f"\nmedhpm demo finished in {took}: mean Dice over the reported organs "
        f"{mean.get('dice_mean', float('nan')):.3f}, mean HD95 {mean.get('hd95_mean') or float('nan'):.1f} mm"
    )
    print(_layout(out))
    return out / "report.html"


def _claim_demo_folder(out: Path, quick: bool, ov: list[str]) -> None:
    """A demo folder is resumable, so its finished stages are reused; refuse a folder that was started with
    other settings (e.g. ``--quick`` first, then the default), whose results would be reported as this run's."""
    mark = out / "demo_settings.json"
    want = {"quick": quick, "overrides": list(ov)}
    if mark.exists():
        try:
            have = json.loads(mark.read_text())
        except ValueError as e:
            raise ValueError(f"{mark}: unreadable demo settings ({e}); delete the folder or use --out") from e
        if have != want:
            raise ValueError(
                f"{out} holds a demo run made with other settings ({mark}: {have}); this call asks for {want}. "
                f"Its finished stages would be reused and reported as this run: use --out for a new folder "
                f"or delete {out}."
            )
    elif out.exists() and any((out / d).exists() for d in ("pretrain", "finetune", "evaluation")):
        raise ValueError(
            f"{out} already holds training results without a {mark.name}; use --out for a new folder or delete it."
        )
    else:
        atomic_write_text(mark, json.dumps(want, indent=2))


def _layout(out: Path) -> str:
    lines = [f"run folder {out}/:"]
    desc = {
        "phantom": "generated phantom CT data set (NIfTI + dataset.json)",
        "pretrain": "HPM pre-training: final.pt, last.pt, encoder.safetensors(+.json), metrics.jsonl, tb/, figures/",
        "finetune": "UNETR fine-tuning: best.pt, final.pt, last.pt, metrics.jsonl, tb/",
        "predictions": "label maps of the test scans, in each scan's own geometry",
        "evaluation": "metrics.json, metrics.csv, table.md (paper Table 1 layout)",
        "figures": "segmentation overlays and training curves",
        "report.html": "the report: open it in a browser",
        "timings.json": "seconds per stage",
    }
    for name, text in desc.items():
        if (out / name).exists():
            lines.append(f"  {name:<14} {text}")
    return "\n".join(lines)


def read_timings(path: Path) -> dict:
    """The stage times a ``timings.json`` records (a demo's, a run's: stage name -> seconds; empty for a new
    or unreadable record)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_demo_report(out: Path, cfg: Config, res: dict, times: dict, quick: bool, kept=()) -> Path:
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    dl = load_datalist(Path(cfg.data.dataset) if cfg.data.dataset != "phantom" else out / "phantom" / "dataset.json")
    overlays = []
    for e in dl["test"][:2]:
        case = e["case"]  # the datalist names every case (medhpm.data.scans.case_name), as prediction does
        pred = out / "predictions" / f"{case}.nii.gz"
        if pred.exists():
            png = segmentation_figure_from_files(
                e["image"],
                e.get("label"),
                pred,
                figs / f"overlay_{case}.png",
                classes="btcv13",
                title=f"{case}: ground truth vs prediction",
            )
            overlays.append((png, f"{case}: ground truth (left) and UNETR+HPM prediction (right)"))
    curves = curves_figure(
        {"pre-training": out / "pretrain", "fine-tuning": out / "finetune"},
        figs / "curves.png",
        title="training curves",
    )
    recon = out / "pretrain" / "figures" / "reconstruction_latest.png"
    table = (out / "evaluation" / "table.md").read_text()
    stage_rows = [["stage", "seconds"]] + [
        [k, f"{v:.1f}" + (" (an earlier call)" if k in kept else "")] for k, v in times.items()
    ]
    m = res["summary"]["mean"]
    sections: list[dict] = [
        {
            "title": "Summary",
            "text": (
                f"{'Quick' if quick else 'Default'} demo on synthetic abdominal CT phantoms: selfMedHPM self-pre-training "
                f"of a {cfg.model.preset} 3D ViT ({cfg.pretrain.epochs} epochs), UNETR fine-tuning "
                f"({cfg.finetune.epochs} epochs), prediction of the held-out test phantoms in their own geometry. "
                f"Mean Dice over the reported organs: {m.get('dice_mean', float('nan')):.3f}; "
                f"mean HD95: {(m.get('hd95_mean') or float('nan')):.1f} mm."
            ),
        },
        {
            "title": "Segmentation of the test phantoms (paper Table 1 layout)",
            "table_md": table,
            "note": "DSC in percent, HD95 in mm in each scan's own voxel spacing; conventions in evaluation/metrics.json.",
        },
        {
            "title": "Pre-training: reconstruction, predicted difficulty and HPM's mask",
            "images": [
                (
                    recon,
                    "original, masked input, reconstruction, reconstruction with visible patches, the EMA teacher's "
                    "predicted difficulty, and the mask (grey: random, red: mined hard patches)",
                )
            ],
        },
        {"title": "Segmentation overlays", "images": overlays},
        {
            "title": "Training curves",
            "images": [(curves, "losses per epoch; validation Dice on the validation subset of the training phantoms")],
        },
        {"title": "Run times", "table": stage_rows},
        {"title": "Resolved configuration", "pre": json.dumps(to_dict(cfg), indent=2)},
    ]
    return write_report(out / "report.html", "medhpm demo report", sections)


# ---------------------------------------------------------------------------------------------- entry point
def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m medhpm.pipeline``: one run of :func:`run_stages` in its own process (the experiment
    runner starts one per method and seed, so that each run's peak memory is its own)."""
    ap = argparse.ArgumentParser(
        prog="python -m medhpm.pipeline",
        description="One pipeline run: [pre-training,] fine-tuning, prediction, evaluation.",
    )
    ap.add_argument("--config", required=True, help="the run's resolved config (a YAML file)")
    ap.add_argument("--dataset", required=True, type=Path, help="the data set (datalist or folder)")
    ap.add_argument("--out", required=True, type=Path, help="the run folder")
    start = ap.add_mutually_exclusive_group()
    start.add_argument("--pretrain", choices=METHODS, help="pre-train with this method, then fine-tune from it")
    start.add_argument("--init", help="fine-tune from these weights instead (no pre-training)")
    ap.add_argument(
        "--pretrain-dir",
        type=Path,
        help="with --pretrain: the pre-training folder (default "
        "OUT/pretrain); a finished one is reused, an interrupted one resumed",
    )
    ap.add_argument("--name", help="row name in the evaluation table")
    ap.add_argument(
        "--pretrain-only",
        action="store_true",
        help="with --pretrain: pre-train (into OUT/pretrain, "
        "or --pretrain-dir) and export the encoder, nothing else (the experiment runner's one "
        "pre-training per method and pre-training seed)",
    )
    args = ap.parse_args(argv)
    if args.pretrain_dir is not None and args.pretrain is None:
        ap.error("--pretrain-dir needs --pretrain METHOD")
    if args.pretrain_only and args.pretrain is None:
        ap.error("--pretrain-only needs --pretrain METHOD")
    if args.pretrain_only:
        with run_folder_lock(args.out, what="pipeline run"):
            cfg = load_config(args.config)
            cfg = replace(
                cfg,
                data=replace(cfg.data, dataset=str(args.dataset)),
                pretrain=replace(cfg.pretrain, method=args.pretrain),
            )
            pretrain_stage(cfg, args.pretrain_dir or args.out / "pretrain", Stages(1, record=args.out / "timings.json"))
        return
    with run_folder_lock(args.out, what="pipeline run"):
        # each run records its stage times (the experiment's budget table reads them)
        stages = Stages(4 if args.pretrain else 3, record=args.out / "timings.json")
        run_stages(
            load_config(args.config),
            args.out,
            args.dataset,
            pretrain_method=args.pretrain,
            init=args.init,
            name=args.name,
            stages=stages,
            pretrain_dir=args.pretrain_dir,
        )


if __name__ == "__main__":
    main()
