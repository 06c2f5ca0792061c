"""The ``medhpm`` command line: one command per pipeline stage, each a thin wrapper over a library function.

Launch recipes:
  one GPU or CPU:    medhpm pretrain --config btcv_paper --out runs/pt
  several GPUs:      torchrun --nproc_per_node 4 -m medhpm.cli pretrain --config btcv_paper --out runs/pt
  several nodes:     torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --rdzv_backend c10d
                     --rdzv_endpoint HOST:29500 -m medhpm.cli pretrain --config btcv_paper --out runs/pt
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from medhpm.runtime.console import error_message, reportable, show_warning, version_text

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Self-pre-train 3D ViTs on CT with Hard Patches Mining (selfMedHPM), fine-tune UNETR, predict, evaluate.",
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(no_args_is_help=True, help="Datalists and data checks.")
viz_app = typer.Typer(no_args_is_help=True, help="Figures: reconstructions, difficulty maps, overlays.")
app.add_typer(data_app, name="data")
app.add_typer(viz_app, name="visualize")


def _version_callback(value: bool):
    if value:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def main_callback(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version_callback,
        is_eager=True,
        help="Print medhpm, Python, torch, MONAI and CUDA versions and the device.",
    ),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks on errors (or MEDHPM_DEBUG=1)."),
):
    del debug  # read by main(), which reports the errors; declared here so that typer accepts it


# ---------------------------------------------------------------------------------------------- data
@app.command()
def phantom(
    out: Path = typer.Argument(..., help="Folder to write imagesTr/, labelsTr/ and dataset.json into."),
    cases: int = typer.Option(6, help="Number of phantom CT volumes."),
    seed: int = typer.Option(0, help="Random seed (the same seed gives the same data)."),
    size: Optional[str] = typer.Option(None, help="Voxels per case as X,Y,Z (default: about 128x128x70)."),
    spacing: Optional[str] = typer.Option(None, help="Voxel spacing in mm as X,Y,Z (default: varied per case)."),
    variability: str = typer.Option(
        "standard",
        help="standard (portal-venous, full abdomen) or wide (every "
        "contrast phase, scanner, build, lesions, partial fields of view; docs/phantoms.md).",
    ),
    dicom: bool = typer.Option(
        False,
        "--dicom",
        help="Also write each CT as a DICOM series (dicom/CASE/) with "
        "the UIDs a DICOM-SEG references: try predict --output-type both on it.",
    ),
):
    """Write synthetic abdominal CT phantoms (NIfTI, BTCV labels) with an MSD-style dataset.json."""
    from medhpm.data.phantom import write_phantom_dataset
    from medhpm.data.phantom.variability import VARIABILITY

    if variability not in VARIABILITY:
        raise typer.BadParameter(f"--variability must be standard or wide, not {variability!r}")
    path = write_phantom_dataset(
        out,
        cases=cases,
        seed=seed,
        size=_triple(size, int, "--size"),
        spacing=_triple(spacing, float, "--spacing"),
        progress=True,
        variability=variability,
        dicom=dicom,
    )
    typer.echo(
        f"wrote {cases} phantom cases and {path}" + (f"; DICOM series in {Path(out) / 'dicom'}" if dicom else "")
    )


@data_app.command("datalist")
def data_datalist(
    source: Path = typer.Argument(..., help="A datalist JSON, nnU-Net raw folder, BTCV folder or folder of scans."),
    out: Path = typer.Option(..., "-o", "--out", help="The MSD-style dataset.json to write."),
    format: str = typer.Option("auto", help="auto | msd | nnunet | btcv | folder"),
    split: str = typer.Option("transunet", help="BTCV split: transunet (18/12) or monai (24/6)."),
):
    """Convert any supported layout into an MSD-style datalist JSON."""
    from medhpm.data.datalist import load_datalist, write_datalist
    from medhpm.runtime.files import refuse_overwriting_inputs

    refuse_overwriting_inputs([out], [source], hint="choose another -o")  # before the source is read
    dl = load_datalist(source, format=format, split=split)
    refuse_overwriting_inputs(
        [out],
        [
            e[k]
            for s in ("training", "validation", "test")
            for e in dl.get(s, [])
            for k in ("image", "label")
            if e.get(k)
        ],
        hint="choose another -o",
    )
    write_datalist(dl, out)
    counts = ", ".join(f"{len(dl.get(k, []))} {k}" for k in ("training", "validation", "test"))
    typer.echo(f"{dl['format']} data set at {source}: {counts}; wrote {out}")


@data_app.command("check")
def data_check(
    dataset: Path = typer.Argument(..., help="A datalist JSON or any folder layout medhpm reads."),
    format: str = typer.Option("auto", help="auto | msd | nnunet | btcv | folder"),
    num_classes: Optional[int] = typer.Option(
        None, help="Classes including background (default: the datalist's labels)."
    ),
    roi: str = typer.Option("96,96,96", help="Training ROI in voxels at --spacing; smaller scans are padded."),
    spacing: str = typer.Option("1.5,1.5,2.0", help="Target spacing in mm used for the ROI check."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON."),
):
    """Read every case and report every problem; exit non-zero if any case is unusable."""
    import json

    from medhpm.data.check import check_dataset
    from medhpm.runtime.files import atomic_write_text

    report = check_dataset(
        dataset,
        num_classes=num_classes,
        roi=_triple(roi, int, "--roi"),
        spacing=_triple(spacing, float, "--spacing"),
        format=format,
    )
    typer.echo(report.format())
    if json_out:
        atomic_write_text(json_out, json.dumps(report.to_dict(), indent=2))
    raise typer.Exit(0 if report.ok else 1)


# ---------------------------------------------------------------------------------------------- training
_CONFIG_HELP = "A packaged config name (demo, btcv_paper, smwb_paper, ...) or a path to a YAML file."
_OVERRIDES_HELP = "Config overrides as key=value, e.g. pretrain.epochs=10 method=mae."


def _default_out(stage: str, cfg) -> Path:
    import time

    return Path("runs") / f"{stage}-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


@app.command(context_settings={"allow_extra_args": False})
def pretrain(
    overrides: Optional[List[str]] = typer.Argument(None, help=_OVERRIDES_HELP),
    config: Optional[str] = typer.Option(None, "--config", "-c", help=_CONFIG_HELP + " Default: demo."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default runs/pretrain-NAME-TIME)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder from last.pt."),
    deterministic: bool = typer.Option(
        False, "--deterministic", help="Deterministic kernels and seeds (CPU: identical losses)."
    ),
):
    """Self-pre-train a 3D ViT as a masked autoencoder (method=hpm|mae|no_lpred|no_learn_to_mask).

    Several GPUs: torchrun --nproc_per_node 4 -m medhpm.cli pretrain --config btcv_paper --out runs/pt
    """
    with _interruptible("pretrain"):
        # the config first: a typo is reported before the (slow) import of the training stack
        cfg, out = _stage_cfg("pretrain", config, overrides, deterministic, out, resume)
        from medhpm.pretrain.trainer import pretrain as run_pretrain

        run = run_pretrain(cfg, out, resume=resume is not None)
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"pre-training finished: {_written(run, 'final.pt', 'last.pt', 'metrics.jsonl', 'figures')}")


class _interruptible:
    """Ctrl-C in a training command: the trainer's message (where the last checkpoint is, the command that
    resumes the run), or that the run had not started; exit code 130. (Typer would exit 130 silently.)"""

    def __init__(self, stage: str):
        self.stage = stage

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if kind is None or not issubclass(kind, KeyboardInterrupt):
            return False
        if os.environ.get("RANK", "0") == "0":
            msg = str(e) or f"interrupted before the {self.stage} run started: nothing was trained or written"
            print(msg, file=sys.stderr, flush=True)
        raise typer.Exit(130)


def _stage_cfg(
    stage: str, config: Optional[str], overrides, deterministic: bool, out: Optional[Path], resume: Optional[Path]
):
    """The config and run folder of a training command: a resumed run's own config (which the overrides may
    only extend), or the given config (default ``demo``) in ``out`` (default a new folder under runs/). A
    resumed run continues in its own folder with its own config: ``--out`` naming another folder or
    ``--config`` beside ``--resume`` is refused, not silently ignored."""
    from medhpm.config import ConfigError, load_config, resume_config

    ov = list(overrides or []) + (["runtime.deterministic=true"] if deterministic else [])
    if resume is not None:
        if out is not None and os.path.realpath(out) != os.path.realpath(resume):
            raise ConfigError(
                f"--resume {resume} continues that run in its own folder, but --out names another folder, {out}: "
                f"give one of them (drop --out to continue {resume}; drop --resume to start a new run in {out})"
            )
        if config is not None:
            raise ConfigError(
                f"--resume {resume} continues that run with the config it was made with (kept in the run), "
                f"so --config {config} would be ignored: drop --config (key=value overrides may extend the "
                "resumed config), or drop --resume to start a new run with it"
            )
        return resume_config(resume, stage, ov), resume
    cfg = load_config(config or "demo", ov)
    return cfg, out or _default_out(stage, cfg)


@app.command("export-encoder")
def export_encoder_cmd(
    ckpt: Path = typer.Argument(..., help="A pre-training checkpoint (final.pt, last.pt) or run folder."),
    out: Path = typer.Option(..., "-o", "--out", help="encoder.safetensors to write (a .json sidecar goes beside it)."),
    teacher: bool = typer.Option(False, "--teacher", help="Export the EMA teacher's encoder instead of the student's."),
    force: bool = typer.Option(False, "--force", help="Replace an encoder already at --out."),
):
    """Export the pre-trained encoder as safetensors with a JSON sidecar (metadata, sha256)."""
    from medhpm.pretrain.export import export_encoder

    path = export_encoder(ckpt, out, use_teacher=teacher, force=force)
    typer.echo(f"wrote {path} and {path.with_suffix('.json')}")


@app.command()
def finetune(
    overrides: Optional[List[str]] = typer.Argument(None, help=_OVERRIDES_HELP),
    config: Optional[str] = typer.Option(None, "--config", "-c", help=_CONFIG_HELP + " Default: demo."),
    init: str = typer.Option(
        "none",
        "--init",
        help="Pre-training checkpoint, encoder.safetensors, MONAI UNETR / SelfMedMAE / 2D ViT checkpoint, or none.",
    ),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default runs/finetune-NAME-TIME)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder from last.pt."),
    teacher: bool = typer.Option(False, "--teacher", help="Initialise from the EMA teacher's encoder."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Accept an encoder load with missing keys."),
    deterministic: bool = typer.Option(False, "--deterministic", help="Deterministic kernels and seeds."),
):
    """Fine-tune UNETR for segmentation from a pre-trained encoder (or from scratch with --init none)."""
    ov = list(overrides or [])
    if teacher:
        ov.append("finetune.use_teacher=true")
    if allow_partial:
        ov.append("finetune.allow_partial_init=true")
    with _interruptible("finetune"):
        cfg, out = _stage_cfg("finetune", config, ov, deterministic, out, resume)
        from medhpm.segment.trainer import finetune as run_finetune

        run = run_finetune(cfg, out, init=init, resume=resume is not None)
    if os.environ.get("RANK", "0") == "0":
        # no best.pt without validation cases (data.val_cases=0): say only what is there
        typer.echo(f"fine-tuning finished: {_written(run, 'best.pt', 'final.pt', 'metrics.jsonl')}")


@app.command()
def predict(
    model: Path = typer.Option(
        ...,
        "--model",
        "-m",
        help="A fine-tuning checkpoint (best.pt / final.pt) or its run folder (its best.pt, else final.pt, else last.pt).",
    ),
    input: Path = typer.Option(
        ..., "-i", "--input", help="A NIfTI file, a folder of them, a DICOM series folder, or a datalist JSON."
    ),
    out: Path = typer.Option(..., "-o", "--out", help="Folder for the label maps (NAME.nii.gz)."),
    overlap: Optional[float] = typer.Option(None, help="Sliding-window overlap (default: the checkpoint's config)."),
    blend: Optional[str] = typer.Option(None, help="gaussian | constant"),
    sw_batch_size: Optional[int] = typer.Option(None, help="Windows per forward pass."),
    probabilities: bool = typer.Option(
        False, "--probabilities", help="Also write class probabilities (NAME_probs.nii.gz)."
    ),
    gpu_output: bool = typer.Option(
        False, "--gpu-output", help="Keep the stitched output on the GPU (faster, more memory)."
    ),
    split: str = typer.Option("test", help="Datalist split to predict when --input is a datalist."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    statistics: bool = typer.Option(
        False, "--statistics", help="Also write statistics.json/.csv: organ volumes (mL), HU mean/std."
    ),
    output_type: str = typer.Option(
        "nifti",
        "--output-type",
        help="nifti | dicom-seg, or a comma list (nifti,dicom-seg; both = the two). DICOM-SEG: DICOM series input only.",
    ),
    tta: bool = typer.Option(
        False, "--tta", help="Test-time flips: mean softmax over the 8 flips of the axes (8x slower)."
    ),
    largest_component: bool = typer.Option(
        False, "--largest-component", help="Keep each organ's largest connected component."
    ),
):
    """Segment new scans; writes label maps in each scan's own shape, affine and orientation."""
    from medhpm.segment.predict import Predictor, plan_predictions

    # outputs onto inputs, two scans with one output name: refused before the checkpoint or a scan is read
    plan_predictions(
        input,
        out,
        split=split,
        save_probabilities=probabilities,
        model=model,
        statistics=statistics,
        output_type=output_type,
    )
    from medhpm.runtime.checkpoint import MODEL_ORDER, resolve_checkpoint

    if model.is_dir():  # say which of the run's checkpoints is used
        typer.echo(f"model: {resolve_checkpoint(model, MODEL_ORDER)}")
    pr = Predictor.from_checkpoint(
        model,
        device=device,
        overlap=overlap,
        blend=blend,
        sw_batch_size=sw_batch_size,
        output_on_cpu=not gpu_output,
        tta=tta,
        largest_component=largest_component,
    )
    from medhpm.runtime.device import configure_cpu_memory, configure_threads

    # the checkpoint's runtime.cpu_memory (auto: reuse on a CPU): each scan's full-size maps reuse the last
    # scan's pages (a demo phantom: 0.62 -> 0.49 s, docs/PERFORMANCE.md section 8)
    configure_cpu_memory(pr.cfg.runtime.cpu_memory, pr.device)
    # torch's own thread count, within a container's CPU quota (not the training machine's runtime.threads)
    capped = configure_threads(0)
    if capped and pr.device.type == "cpu":
        import torch

        n = torch.get_num_threads()
        typer.echo(f"prediction on {n} CPU thread{'' if n == 1 else 's'}: {capped}")
    results = pr.predict_path(
        input, out, save_probabilities=probabilities, split=split, statistics=statistics, output_type=output_type
    )
    failed = [r for r in results if not r["ok"]]
    for r in results:
        status = "ok" if r["ok"] else f"FAILED: {r['error']}"
        typer.echo(f"{r['input']} -> {r.get('output', '-')}: {status}")
    typer.echo(f"{len(results) - len(failed)} of {len(results)} scans segmented into {out}")
    raise typer.Exit(1 if failed else 0)


@app.command("export-model")
def export_model_cmd(
    ckpt: Path = typer.Argument(
        ...,
        help="A fine-tuning checkpoint (best.pt / final.pt) or its run folder (its best.pt, else final.pt, else last.pt).",
    ),
    out: Path = typer.Option(..., "-o", "--out", help="Folder to write (new or empty; see --force)."),
    fmt: str = typer.Option("bundle", "--format", "-f", help="bundle | onnx | torchscript"),
    force: bool = typer.Option(False, "--force", help="Replace an output folder that is not empty."),
    license_file: Optional[Path] = typer.Option(None, "--license", help="A license text to ship as LICENSE."),
):
    """Export a fine-tuned model to run without medhpm, giving the label maps of `medhpm predict`.

    \b
    bundle       a MONAI bundle (monai.bundle run, MONAI Label, model zoo
                 tools); configs/inference.json: the same preprocessing,
                 sliding window and inversion
    onnx         model.onnx (one ROI in, logits out) for onnxruntime, and
                 export.json: the settings to reproduce `medhpm predict`
    torchscript  model.ts for torch.jit.load alone, and export.json
    Each records the medhpm version, the checkpoint's sha256 and config.
    """
    from medhpm.segment.export import export_model

    path = export_model(ckpt, out, fmt, force=force, license_file=license_file)
    typer.echo(f"wrote {path} ({fmt})")


@app.command()
def evaluate(
    pred: Path = typer.Option(..., "--pred", help="Predicted label map, folder of them, or a datalist."),
    label: Path = typer.Option(..., "--label", help="Ground-truth label map, folder of them, or a datalist."),
    classes: Optional[str] = typer.Option(
        None,
        "--classes",
        help="btcv8 | btcv13 | NAME=VALUE,... (default: the "
        "datalist's labels, else the checkpoint's from predict, else by value).",
    ),
    out: Path = typer.Option(..., "-o", "--out", help="Folder for metrics.json, metrics.csv and table.md."),
    method: str = typer.Option("model", help="Row name in the Table-1-style table."),
    surface_tolerance: Optional[float] = typer.Option(
        None,
        "--surface-tolerance",
        help="Normalised surface Dice tolerance in mm (default: finetune.surface_tolerance_mm, 1).",
    ),
    only_predicted: bool = typer.Option(
        False,
        "--only-predicted",
        help="Evaluate the ground-truth cases that have a prediction, skip the rest (default: every one must have one).",
    ),
    split: str = typer.Option(
        "test", "--split", help="Which list of a datalist --label (or --pred) is read: test, validation or training."
    ),
):
    """Per-case, per-organ Dice, HD95, surface Dice and ASSD (mm); a Table-1-style Markdown table."""
    from medhpm.evaluate.run import evaluate_predictions

    tol = {} if surface_tolerance is None else {"surface_tolerance_mm": surface_tolerance}
    res = evaluate_predictions(pred, label, classes, out, split, method=method, only_predicted=only_predicted, **tol)
    mean = res["summary"]["mean"]
    skipped = res["not_evaluated"]
    if skipped:
        typer.echo(f"{len(skipped)} ground-truth case(s) without a prediction not evaluated: {', '.join(skipped)}")
    typer.echo(
        f"{len(res['cases'])} cases: mean Dice {_fmt(mean.get('dice_mean'))}, "
        f"mean HD95 {_fmt(mean.get('hd95_mean'))} mm; wrote {out}/metrics.json, metrics.csv, table.md"
    )
    table = Path(out) / "table.md"
    if table.exists():
        typer.echo(table.read_text())


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


@viz_app.command("pretrain")
def visualize_pretrain(
    ckpt: Path = typer.Argument(..., help="A pre-training checkpoint."),
    image: Path = typer.Option(..., "--image", help="A CT scan (NIfTI file or DICOM folder)."),
    out: Path = typer.Option(..., "-o", "--out", help="PNG to write."),
    seed: int = typer.Option(0, help="Seed of the masks and of the check's crops."),
    label: Optional[Path] = typer.Option(
        None,
        "--label",
        help="The scan's label map: adds the organ share of the patches the teacher ranks hardest (the lift).",
    ),
    crops: int = typer.Option(16, "--crops", help="Random crops of the scan for the teacher check."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the teacher check's figures here."),
):
    """Original, masked input, reconstruction, predicted difficulty and HPM's mask on orthogonal slices;
    for an hpm checkpoint also how well its teacher ranks the student's losses on random crops of the scan."""
    from medhpm.viz.reconstruction import visualize_pretrain_checkpoint

    path, check = visualize_pretrain_checkpoint(
        ckpt, image, out, seed=seed, label=label, crops=crops, json_out=json_out
    )
    typer.echo(f"wrote {path}")
    if check is not None:
        student = (
            f"; the student's own predicted losses {check['student_spearman']:.2f} / "
            f"{check['student_pair_accuracy']:.3f}"
            if "student_spearman" in check
            else ""
        )
        position = f"; position alone {check['position_spearman']:.2f}" if "position_spearman" in check else ""
        lift = (
            f"; organ share of the top-scored half {check['organ_share_top']:.2f} vs "
            f"{check['organ_share_all']:.2f} of all patches (lift {check['organ_lift']:.2f})"
            if "organ_lift" in check
            else ""
        )
        typer.echo(
            f"teacher ({check['teacher_view']} view) on {check['crops']} random crops: Spearman "
            f"{check['teacher_spearman']:.2f}, pair accuracy {check['teacher_pair_accuracy']:.3f} against "
            f"the student's measured losses{student}{position}{lift}" + (f"; wrote {json_out}" if json_out else "")
        )


@viz_app.command("segmentation")
def visualize_segmentation(
    image: Path = typer.Option(..., "--image", help="The CT scan (NIfTI file or DICOM series folder)."),
    label: Optional[Path] = typer.Option(None, "--label", help="Ground-truth label map."),
    pred: Optional[Path] = typer.Option(None, "--pred", help="Predicted label map."),
    out: Path = typer.Option(..., "-o", "--out", help="PNG to write."),
    classes: str = typer.Option("btcv13", "--classes", help="Legend names: btcv8 | btcv13 | NAME=VALUE,..."),
):
    """Slices with ground truth and prediction overlaid (paper Fig. 4 style)."""
    from medhpm.viz.overlay import segmentation_figure_from_files

    path = segmentation_figure_from_files(image, label, pred, out, classes=classes)
    typer.echo(f"wrote {path}")


# ---------------------------------------------------------------------------------------------- main job
@app.command()
def demo(
    quick: bool = typer.Option(
        False, "--quick", help="A smoke run (fewer phantoms and epochs): 30 s to 3 min on 2 CPU cores."
    ),
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run folder."),
    overrides: Optional[List[str]] = typer.Argument(None, help=_OVERRIDES_HELP),
):
    """No data needed: phantoms -> HPM pre-training -> UNETR fine-tuning -> prediction -> evaluation -> report.html."""
    from medhpm.pipeline import run_demo

    report = run_demo(out, quick=quick, overrides=overrides)
    typer.echo(f"report: {report}")


@app.command()
def experiment(
    config: str = typer.Option(
        "demo_experiment",
        "--config",
        "-c",
        help="demo_experiment | label_efficiency | btcv_paper | smwb_paper | a YAML path.",
    ),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Experiment folder (default runs/experiment-NAME)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Overrides of the base config, key=value."),
):
    """Methods x seeds with the same budget, then Table-1 and Table-3 style comparisons; resumable."""
    from medhpm.experiment import run_experiment

    path = run_experiment(config, out, overrides=overrides)
    typer.echo(f"results: {path}")


# ---------------------------------------------------------------------------------------------- helpers
def _triple(text: Optional[str], kind, name: str):
    if text is None:
        return None
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) == 1:
        parts = parts * 3
    try:
        vals = tuple(kind(p) for p in parts)
    except ValueError:
        raise typer.BadParameter(f"{name} must be three numbers like 96,96,96, not {text!r}") from None
    if len(vals) != 3:
        raise typer.BadParameter(f"{name} must be three numbers like 96,96,96, not {text!r}")
    if not all(0 < v < float("inf") for v in vals):  # a zero spacing divided by zero further on
        example = "1.5,1.5,2.0" if kind is float else "96,96,96"
        raise typer.BadParameter(f"{name} must be three positive numbers like {example}, not {text!r}")
    return vals


def _written(run: Path, *names: str) -> str:
    """``run (a, b, ...)``: those of ``names`` that the run wrote (a folder with a trailing /)."""
    there = [n + "/" if (Path(run) / n).is_dir() else n for n in names if (Path(run) / n).exists()]
    return f"{run} ({', '.join(there)})"


def main(argv: Optional[List[str]] = None) -> None:
    import functools
    import warnings

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MEDHPM_DEBUG") == "1"
    shown_as = warnings.showwarning
    if not debug:
        warnings.showwarning = functools.partial(show_warning, _default=shown_as)
    try:
        # standalone mode: typer/click print usage errors and exit with their own codes
        app(args=argv, prog_name="medhpm")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        shown = reportable(e)
        if debug or shown is None:
            raise
        print(f"error: {error_message(shown)}", file=sys.stderr)
        sys.exit(2)
    finally:
        warnings.showwarning = shown_as


if __name__ == "__main__":
    main()
