"""`medhpm export-model` (issue 17): a MONAI bundle run by MONAI's own runner with medhpm hidden, an ONNX
model run by onnxruntime and a TorchScript model loaded by torch.jit.load alone give the label maps of
`medhpm predict` (per-organ Dice >= 0.999, the same geometry) and its logits on one ROI (within 1e-4), on a
tiny UNETR fine-tuned for a few steps (equality is about the runtimes, not the accuracy), on a phantom and
on the real DICOM fixture. Bad inputs are refused with a sentence naming the file, and nothing is left."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from testkit import TINY

from medhpm.config import load_config, to_dict
from medhpm.data.transforms import predict_transforms
from medhpm.models.dynunet import build_dynunet
from medhpm.runtime.files import sha256_file
from medhpm.segment import export as ex
from medhpm.segment.export import ExportError, export_model, exported_predictor
from medhpm.segment.predict import Predictor, load_model

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the repository root, for the package `benchmarks`
    sys.path.insert(0, str(ROOT))
REAL_DICOM = Path(__file__).resolve().parents[1] / "data" / "real_ct" / "abdomen_dicom" / "dicom"
SETTINGS = [f"{k}={v}" for k, v in TINY.items()]

# MONAI's bundle runner and plain torch.jit.load run in a Python that cannot import medhpm, as a user without
# medhpm would run them: `python -I` (no PYTHONPATH, which points at this checkout, no user site) with a
# meta-path finder placed first that refuses every `medhpm` import, whether the shared venv holds medhpm as
# an editable .pth finder or as a regular install; the script proves `import medhpm` fails before it runs
# anything (benchmarks/export_check.py, shared with the demo-size check).
from benchmarks.export_check import run_without_medhpm as _run_hidden  # noqa: E402


def run_without_medhpm(*args, cwd: Path) -> subprocess.CompletedProcess:
    return _run_hidden(*args, cwd=cwd, timeout=900, threads=1)


def dice_per_label(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    """Dice of each foreground label present in either map (plain numpy)."""
    out = {}
    for v in sorted(set(np.unique(a)) | set(np.unique(b))):
        if v == 0:
            continue
        x, y = a == v, b == v
        out[int(v)] = 2.0 * np.logical_and(x, y).sum() / (x.sum() + y.sum())
    return out


def assert_same_label_map(ref_path: Path, got_path: Path, canonical: bool = False, min_voxels: int = 0) -> None:
    """Same shape and affine, uint8, Dice >= 0.999 for every label (with ``min_voxels``: for every label with
    at least that many voxels in the reference, and at most 1e-4 of all voxels differing)."""
    ref, got = nib.load(str(ref_path)), nib.load(str(got_path))
    if canonical:  # the same world grid, whatever the slice order in the file
        ref, got = nib.as_closest_canonical(ref), nib.as_closest_canonical(got)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got.affine, ref.affine, atol=1e-4)
    a, b = np.asarray(ref.dataobj), np.asarray(got.dataobj)
    assert b.dtype == np.uint8
    dice = dice_per_label(a, b)
    assert len(dice) >= 2, f"the reference predicts almost nothing: {dice}"
    large = {k: d for k, d in dice.items() if (a == k).sum() >= min_voxels}
    assert large and min(large.values()) >= 0.999, dice
    if min_voxels:
        assert np.mean(a != b) <= 1e-4, dice


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(phantom data set, pre-training run, fine-tuning best.pt initialised from it): a micro UNETR on 32^3
    ROIs at 4 mm, a few steps each."""
    from medhpm.data.phantom import write_phantom_dataset
    from medhpm.pretrain.trainer import pretrain
    from medhpm.segment.trainer import finetune

    root = tmp_path_factory.mktemp("export")
    data = write_phantom_dataset(root / "phantoms", cases=5, seed=3, size=(48, 48, 32))
    pt = pretrain(
        load_config("demo", SETTINGS + [f"data.dataset={data}", "pretrain.epochs=1", "pretrain.steps_per_epoch=1"]),
        root / "pt",
    )
    ft = finetune(
        load_config(
            "demo",
            SETTINGS + [f"data.dataset={data}", "finetune.epochs=2", "finetune.steps_per_epoch=3", "finetune.lr=3e-3"],
        ),
        root / "ft",
        init=str(pt / "final.pt"),
    )
    return data, pt, ft / "best.pt"


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {fmt: export_model(runs[2], root / fmt, fmt) for fmt in ex.FORMATS}


@pytest.fixture(scope="module")
def phantom_scan(runs) -> Path:
    data = runs[0]
    test = json.loads(data.read_text())["test"][0]["image"]
    return data.parent / test


@pytest.fixture(scope="module")
def predicted(runs, phantom_scan, tmp_path_factory):
    """`medhpm predict`'s label maps of the phantom and the real DICOM series (the command itself)."""
    out = tmp_path_factory.mktemp("predict")
    for src in (phantom_scan, REAL_DICOM):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "medhpm",
                "predict",
                "--model",
                str(runs[2]),
                "-i",
                str(src),
                "-o",
                str(out),
                "--device",
                "cpu",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr
    return {"phantom": out / phantom_scan.name, "dicom": out / "dicom.nii.gz"}


# ---------------------------------------------------------------------------------------------- the bundle
def test_bundle_layout_metadata_and_provenance(exports, runs):
    b = exports["bundle"]
    assert {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()} == {
        "configs/metadata.json",
        "configs/inference.json",
        "models/model.ts",
        "docs/README.md",
        "docs/metadata_schema.json",
    }
    meta = json.loads((b / "configs" / "metadata.json").read_text())
    ckpt_cfg = torch.load(runs[2], weights_only=True)["config"]
    assert meta["medhpm"]["checkpoint_sha256"] == sha256_file(runs[2])
    assert meta["medhpm"]["medhpm_version"] == __import__("medhpm").__version__
    assert meta["medhpm"]["config"] == json.loads(json.dumps(ckpt_cfg))
    # labels, input spacing and HU window, architecture, pre-training method (read from the init file)
    labels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert labels["0"] == "background" and labels["1"] == "spleen" and len(labels) == 14
    assert meta["labels"] == labels
    assert meta["input_spacing_mm"] == [4.0, 4.0, 4.0] and meta["hu_window"] == [-175.0, 250.0]
    assert meta["architecture"] == "unetr" and meta["pretraining_method"] == "hpm"
    assert meta["medhpm"]["pretraining"]["init"] == str(runs[1] / "final.pt")
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32, 32]


def test_bundle_verification_commands_pass_without_medhpm(exports, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(exports["bundle"], bundle)
    # verify_metadata downloads the schema its metadata names unless --filepath exists: offline, the
    # bundle's transcription of the specification's mandatory keys (docs/export.md)
    r = run_without_medhpm(
        "monai.bundle",
        "verify_metadata",
        "--meta_file",
        "configs/metadata.json",
        "--filepath",
        "docs/metadata_schema.json",
        cwd=bundle,
    )
    assert "metadata is verified with no error" in r.stdout + r.stderr
    r = run_without_medhpm(
        "monai.bundle",
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        "--bundle_root",
        str(bundle),
        "--device",
        "cpu",
        cwd=bundle,
    )
    assert "data shape of network is verified with no error" in r.stdout + r.stderr


def test_the_offline_schema_refuses_metadata_without_a_mandatory_key(exports):
    jsonschema = pytest.importorskip("jsonschema")
    meta = json.loads((exports["bundle"] / "configs" / "metadata.json").read_text())
    schema = json.loads((exports["bundle"] / "docs" / "metadata_schema.json").read_text())
    jsonschema.validate(meta, schema)
    # MONAI's own schema (meta_schema_20240725.json) requires required_packages_version and takes authors
    # as a string: the transcription refuses what that schema refuses
    for broken in (
        {k: v for k, v in meta.items() if k != "network_data_format"},
        {k: v for k, v in meta.items() if k != "required_packages_version"},
        {**meta, "authors": ["a", "b"]},
        {**meta, "network_data_format": {"inputs": {"image": {"type": "image"}}, "outputs": {}}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


# MONAI's own metadata schema is not shipped with this repository (its source states no license, see
# docs/export.md); point MEDHPM_MONAI_META_SCHEMA at a copy of meta_schema_20240725.json to check against it.
MONAI_META_SCHEMA = os.environ.get("MEDHPM_MONAI_META_SCHEMA", "")


@pytest.mark.skipif(
    not os.path.isfile(MONAI_META_SCHEMA),
    reason="MONAI's meta_schema_20240725.json is not here: set MEDHPM_MONAI_META_SCHEMA to its path",
)
def test_metadata_passes_monais_own_schema(exports, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(Path(MONAI_META_SCHEMA).read_text())
    meta = json.loads((exports["bundle"] / "configs" / "metadata.json").read_text())
    assert meta["schema"].endswith("/" + Path(MONAI_META_SCHEMA).name)
    jsonschema.validators.validator_for(schema)(schema).validate(meta)
    with pytest.raises(jsonschema.ValidationError):  # the file is a real schema, not one that takes anything
        jsonschema.validators.validator_for(schema)(schema).validate({k: v for k, v in meta.items() if k != "task"})
    # and MONAI's own command, given that file, in a Python without medhpm
    bundle = tmp_path / "bundle"
    shutil.copytree(exports["bundle"], bundle)
    r = run_without_medhpm(
        "monai.bundle",
        "verify_metadata",
        "--meta_file",
        "configs/metadata.json",
        "--filepath",
        str(Path(MONAI_META_SCHEMA).resolve()),
        cwd=bundle,
    )
    assert "metadata is verified with no error" in r.stdout + r.stderr


# MONAI Label is not a test dependency (it pins its own stack); point MEDHPM_MONAILABEL_PYTHON at a Python that has
# it (docs/export.md says how it was installed) to run its BundleInferTask on the bundle.
MONAILABEL_PYTHON = os.environ.get("MEDHPM_MONAILABEL_PYTHON", "")


@pytest.mark.skipif(
    not os.path.isfile(MONAILABEL_PYTHON),
    reason="no MONAI Label here: set MEDHPM_MONAILABEL_PYTHON to a Python with monailabel",
)
def test_monai_label_bundle_infer_task_equals_predict(exports, phantom_scan, predicted, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(exports["bundle"], bundle)
    out = tmp_path / "monailabel.nii.gz"
    script = Path(__file__).with_name("monailabel_infer.py")
    r = subprocess.run(
        [MONAILABEL_PYTHON, "-I", str(script), str(bundle), str(phantom_scan), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    labels = json.loads(r.stdout.strip().splitlines()[-1])
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert labels == {v.lower(): int(k) for k, v in channel_def.items() if int(k) != 0}
    ref, got = nib.load(str(predicted["phantom"])), nib.load(str(out))
    assert got.shape[:3] == ref.shape  # MONAI Label's writer may keep a trailing channel axis of 1
    np.testing.assert_allclose(got.affine, ref.affine, atol=1e-4)
    a = np.asarray(ref.dataobj)
    b = np.asarray(got.dataobj).reshape(ref.shape)
    np.testing.assert_array_equal(b, np.round(b))  # MONAI Label writes float32 label values
    dice = dice_per_label(a, b.astype(np.uint8))
    assert len(dice) >= 2 and min(dice.values()) >= 0.999, dice


def test_bundle_run_by_monai_without_medhpm_equals_predict(exports, phantom_scan, predicted, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(exports["bundle"], bundle)
    out = tmp_path / "labels"
    run_without_medhpm(
        "monai.bundle",
        "run",
        "--config_file",
        "configs/inference.json",
        "--bundle_root",
        str(bundle),
        "--datalist",
        repr([str(phantom_scan), str(REAL_DICOM)]),
        "--output_dir",
        str(out),
        cwd=bundle,
    )
    assert sorted(p.name for p in out.iterdir()) == sorted([phantom_scan.name, "dicom.nii.gz"])
    # a NIfTI comes back on its own grid exactly
    assert_same_label_map(predicted["phantom"], out / phantom_scan.name)
    # MONAI's PydicomReader stacks a series by InstanceNumber, medhpm's reader by position along the slice
    # normal: the same world grid, stored in opposite slice order in this fixture (tests/data/real_ct)
    assert_same_label_map(predicted["dicom"], out / "dicom.nii.gz", canonical=True)


# ---------------------------------------------------------------------------------------------- ONNX, TorchScript
def _one_roi(runs, scan: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(one preprocessed ROI of ``scan``, the PyTorch model's logits on it)."""
    model, cfg, _ = load_model(runs[2])
    img = predict_transforms(cfg.data)({"image": str(scan)})["image"].as_tensor()
    x = img[None, :, :32, :32, :32].contiguous()
    assert x.shape == (1, 1, 32, 32, 32) and float(x.std()) > 0.05
    with torch.no_grad():
        return x, model(x)


def test_onnx_passes_the_checker_and_onnxruntime_matches_pytorch_on_one_roi(exports, runs, phantom_scan):
    import onnx
    import onnxruntime as ort

    path = exports["onnx"] / "model.onnx"
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    x, ref = _one_roi(runs, phantom_scan)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})[0]
    assert got.shape == (1, 14, 32, 32, 32)
    assert np.max(np.abs(got - ref.numpy())) <= 1e-4
    both = session.run(None, {"image": torch.cat([x, x.flip(2)]).numpy()})[0]  # the batch size is free
    np.testing.assert_allclose(both[0], got[0], atol=1e-5)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["checkpoint_sha256"] == sha256_file(runs[2])


def test_torchscript_loads_with_torch_alone_and_matches_pytorch_on_one_roi(exports, runs, phantom_scan, tmp_path):
    x, ref = _one_roi(runs, phantom_scan)
    torch.save({"x": x}, tmp_path / "x.pt")
    script = (
        "import json, torch; files = {'export.json': ''}; "
        f"m = torch.jit.load({str(exports['torchscript'] / 'model.ts')!r}, _extra_files=files); "
        f"y = m(torch.load({str(tmp_path / 'x.pt')!r})['x']); torch.save({{'y': y}}, 'y.pt'); "
        "print(json.loads(files['export.json'])['checkpoint_sha256'])"
    )
    r = run_without_medhpm("-c", script, cwd=tmp_path)
    assert r.stdout.strip().splitlines()[-1] == sha256_file(runs[2])
    got = torch.load(tmp_path / "y.pt", weights_only=True)["y"]
    assert float((got - ref).abs().max()) <= 1e-4


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_networks_through_medhpms_sliding_window_equal_predict(
    fmt, exports, runs, phantom_scan, predicted, tmp_path
):
    p = exported_predictor(exports[fmt])
    # TorchScript runs PyTorch's own kernels: the same label maps. onnxruntime's kernels round differently
    # (logits within 1e-5 here), so a voxel whose two best classes PyTorch itself separates by less than
    # that may flip: on this barely trained model's tiny organs one voxel already costs 0.002 Dice. Hence
    # for ONNX: Dice >= 0.999 for every label of >= 1000 voxels, at most 1e-4 of the voxels differ, and
    # every disagreement on the preprocessed grid is such a near tie of PyTorch's logits.
    min_voxels = 1000 if fmt == "onnx" else 0
    assert_same_label_map(predicted["phantom"], p.predict_file(phantom_scan, tmp_path), min_voxels=min_voxels)
    assert_same_label_map(predicted["dicom"], p.predict_file(REAL_DICOM, tmp_path, name="dicom"), min_voxels=min_voxels)
    ref = Predictor.from_checkpoint(runs[2], device="cpu")
    img = ref.transform({"image": str(phantom_scan)})["image"]
    want, got = ref._infer(img, probabilities=False), p._infer(img, probabilities=False)
    diff = float((want - got).abs().max())
    assert diff <= 1e-4
    top2 = want.topk(2, dim=0).values
    flipped = want.argmax(0) != got.argmax(0)
    assert bool(((top2[0] - top2[1])[flipped] <= 2 * diff).all())


def test_export_json_records_version_checksum_config_and_the_settings(exports, runs):
    cfg = load_config("demo", SETTINGS)
    for fmt in ("onnx", "torchscript"):
        meta = json.loads((exports[fmt] / "export.json").read_text())
        assert meta["medhpm_version"] == __import__("medhpm").__version__
        assert meta["checkpoint_sha256"] == sha256_file(runs[2])
        assert meta["config"]["data"]["roi"] == [32, 32, 32] and meta["config"]["model"] == json.loads(
            json.dumps(to_dict(cfg)["model"])
        )
        s = meta["settings"]
        assert s["preprocessing"]["spacing_mm"] == [4.0, 4.0, 4.0]
        assert s["preprocessing"]["hu_window"] == [-175.0, 250.0]
        assert s["sliding_window"] == {**s["sliding_window"], "roi": [32, 32, 32], "overlap": 0.5, "blend": "gaussian"}
        assert meta["check"]["max_abs_logit_difference"] <= 1e-4


def test_dynunet_traces_and_exports_to_onnx_within_the_tolerance(tmp_path):
    """Every format takes the DynUNet reference row (a CNN: no shape a tracer cannot follow)."""
    torch.manual_seed(0)
    model = build_dynunet(1, 3, (32, 32, 32)).eval()
    cfg = load_config("demo", SETTINGS + ["finetune.architecture=dynunet"])
    extra = {"checkpoint_sha256": "0" * 64}
    assert ex._torchscript(model, Path("dyn.pt"), cfg, tmp_path / "m.ts", extra)["max_abs_logit_difference"] <= 1e-4
    assert ex._onnx(model, Path("dyn.pt"), cfg, tmp_path / "m.onnx", extra)["max_abs_logit_difference"] <= 1e-4


# ---------------------------------------------------------------------------------------------- bad input
def _medhpm(*args):
    return subprocess.run(
        [sys.executable, "-m", "medhpm", *map(str, args)], capture_output=True, text=True, timeout=600
    )


def test_a_pretraining_checkpoint_and_an_encoder_file_are_refused_naming_the_file(runs, tmp_path):
    from medhpm.pretrain.trainer import export_encoder

    pt = runs[1] / "final.pt"
    r = _medhpm("export-model", pt, "-o", tmp_path / "a")
    assert r.returncode == 2 and str(pt) in r.stderr and "fine-tuning checkpoint" in r.stderr, r.stderr
    enc = export_encoder(pt, tmp_path / "enc" / "encoder.safetensors")
    r = _medhpm("export-model", enc, "-o", tmp_path / "b", "--format", "onnx")
    assert r.returncode == 2 and str(enc) in r.stderr and "encoder file" in r.stderr, r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_folder_that_is_not_empty_is_refused_unless_force(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = _medhpm("export-model", runs[2], "-o", out, "--format", "torchscript")
    assert r.returncode == 2 and f"{out} exists and is not empty" in r.stderr and "--force" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    r = _medhpm("export-model", runs[2], "-o", out, "--format", "torchscript", "--force")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.ts"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    # a folder that holds the checkpoint is never replaced, even with --force
    with pytest.raises(ExportError, match="holds the checkpoint"):
        export_model(runs[2], runs[2].parent, "onnx", force=True)


def test_an_export_that_fails_leaves_nothing_behind(runs, tmp_path, monkeypatch):
    """A network whose export differs from PyTorch is refused after the work, and the temporary folder goes."""
    monkeypatch.setattr(ex, "TOLERANCE", 0.0)  # any rounding difference now counts as a failed export
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=f"ONNX export of {runs[2]}.*differs from the PyTorch model"):
        export_model(runs[2], out, "onnx")
    assert list(tmp_path.iterdir()) == []


def test_temporary_folders_of_killed_exports_are_removed(tmp_path):
    out = tmp_path / "model"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".model.{int(dead.stdout)}.export.tmp"  # a finished process: its id is free
    live = tmp_path / f".model.{os.getppid()}.export.tmp"  # a running process (pytest's parent)
    other = tmp_path / f".other.{int(dead.stdout)}.export.tmp"
    for d in (stale, live, other):
        (d / "models").mkdir(parents=True)
    assert ex.remove_stale_export_temps(out) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_the_help_says_what_each_format_is_for():
    r = _medhpm("export-model", "--help")
    assert r.returncode == 0
    for word in ("bundle", "monai.bundle run", "onnxruntime", "torch.jit.load", "--force"):
        assert word in r.stdout, word
