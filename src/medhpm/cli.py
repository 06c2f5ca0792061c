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

_STATE = {"debug": False}


def _version_text() -> str:
    import platform

    import monai
    import torch

    from medhpm import __version__
    from medhpm.runtime.device import pick_device

    cuda = torch.version.cuda or "none (CPU build)"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return (
        f"medhpm {__version__}\n"
        f"python {platform.python_version()}\n"
        f"torch {torch.__version__}\n"
        f"monai {monai.__version__}\n"
        f"cuda {cuda} ({gpus} GPU{'s' if gpus != 1 else ''} visible)\n"
        f"device {pick_device('auto')}"
    )


def _version_callback(value: bool):
    if value:
        typer.echo(_version_text())
        raise typer.Exit()


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print medhpm, Python, torch, MONAI and CUDA versions and the device."),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks on errors."),
):
    _STATE["debug"] = debug or os.environ.get("MEDHPM_DEBUG") == "1"


# ---------------------------------------------------------------------------------------------- data
@app.command()
def phantom(
    out: Path = typer.Argument(..., help="Folder to write imagesTr/, labelsTr/ and dataset.json into."),
    cases: int = typer.Option(6, help="Number of phantom CT volumes."),
    seed: int = typer.Option(0, help="Random seed (the same seed gives the same data)."),
    size: Optional[str] = typer.Option(None, help="Voxels per case as X,Y,Z (default: about 128x128x70)."),
    spacing: Optional[str] = typer.Option(None, help="Voxel spacing in mm as X,Y,Z (default: varied per case)."),
):
    """Write synthetic abdominal CT phantoms (NIfTI, BTCV labels) with an MSD-style dataset.json."""
    from medhpm.data.phantom import write_phantom_dataset

    path = write_phantom_dataset(out, cases=cases, seed=seed, size=_triple(size, int, "--size"),
                                 spacing=_triple(spacing, float, "--spacing"), progress=True)
    typer.echo(f"wrote {cases} phantom cases and {path}")


@data_app.command("datalist")
def data_datalist(
    source: Path = typer.Argument(..., help="A datalist JSON, nnU-Net raw folder, BTCV folder or folder of scans."),
    out: Path = typer.Option(..., "-o", "--out", help="The MSD-style dataset.json to write."),
    format: str = typer.Option("auto", help="auto | msd | nnunet | btcv | folder"),
    split: str = typer.Option("transunet", help="BTCV split: transunet (18/12) or monai (24/6)."),
):
    """Convert any supported layout into an MSD-style datalist JSON."""
    from medhpm.data.datalist import load_datalist, write_datalist

    dl = load_datalist(source, format=format, split=split)
    write_datalist(dl, out)
    counts = ", ".join(f"{len(dl.get(k, []))} {k}" for k in ("training", "validation", "test"))
    typer.echo(f"{dl['format']} data set at {source}: {counts}; wrote {out}")


@data_app.command("check")
def data_check(
    dataset: Path = typer.Argument(..., help="A datalist JSON or any folder layout medhpm reads."),
    format: str = typer.Option("auto", help="auto | msd | nnunet | btcv | folder"),
    num_classes: Optional[int] = typer.Option(None, help="Classes including background (default: the datalist's labels)."),
    roi: str = typer.Option("96,96,96", help="Training ROI in voxels at --spacing; smaller scans are padded."),
    spacing: str = typer.Option("1.5,1.5,2.0", help="Target spacing in mm used for the ROI check."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON."),
):
    """Read every case and report every problem; exit non-zero if any case is unusable."""
    import json

    from medhpm.data.check import check_dataset
    from medhpm.runtime.io import atomic_write_text

    report = check_dataset(dataset, num_classes=num_classes, roi=_triple(roi, int, "--roi"),
                           spacing=_triple(spacing, float, "--spacing"), format=format)
    typer.echo(report.format())
    if json_out:
        atomic_write_text(json_out, json.dumps(report.to_dict(), indent=2))
    raise typer.Exit(0 if report.ok else 1)


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
    return vals


def _user_errors():
    """Exceptions that mean bad input or a bad config: shown as one clear line, no traceback."""
    from medhpm.config import ConfigError
    from medhpm.runtime.checkpoint import CheckpointError

    errs: list[type] = [ConfigError, CheckpointError, ValueError, OSError, KeyError]
    try:
        from medhpm.runtime.loop import NonFiniteLossError, TrainingError

        errs += [NonFiniteLossError, TrainingError]
    except ImportError:
        pass
    return tuple(errs)


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MEDHPM_DEBUG") == "1"
    try:
        # standalone mode: typer/click print usage errors and exit with their own codes
        app(args=argv, prog_name="medhpm")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except _user_errors() as e:
        if debug:
            raise
        msg = str(e).strip() or type(e).__name__
        if isinstance(e, KeyError):
            msg = f"missing key {msg}"
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
