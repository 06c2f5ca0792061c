"""The MONAI bundle of an exported model (``medhpm export-model --format bundle``, :mod:`medhpm.segment.export`):
``configs/inference.json`` (MONAI's own transforms, inferer and evaluator: no medhpm import), ``metadata.json``
with the provenance, the bundle's ``docs/README.md``, and the JSON Schema of the MONAI Bundle Specification's
mandatory metadata that ``python -m monai.bundle verify_metadata`` checks offline (docs/export.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medhpm import __version__
from medhpm.config import Config

# The schema URL MONAI's own bundles name; verify_metadata downloads it unless --filepath names a file that
# exists (offline: the bundle's docs/metadata_schema.json, medhpm's transcription of the specification).
MONAI_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)


def bundle_inference(settings: dict) -> dict:
    """``configs/inference.json``: MONAI's transforms, inferer and evaluator only (no medhpm import)."""
    pre, sw = settings["preprocessing"], settings["sliding_window"]
    b_min = pre["scaled_range"][0]
    transforms: list[dict] = [
        # NIfTI through nibabel, a DICOM series folder through pydicom (tried in that order)
        {
            "_target_": "LoadImaged",
            "keys": "image",
            "reader": ["PydicomReader", "NibabelReader"],
            "ensure_channel_first": True,
            "dtype": "$numpy.float32",
            "image_only": True,
        },
        {"_target_": "Orientationd", "keys": "image", "axcodes": pre["orientation"], "labels": None},
        {"_target_": "Spacingd", "keys": "image", "pixdim": pre["spacing_mm"], "mode": "bilinear"},
        {
            "_target_": "ScaleIntensityRanged",
            "keys": "image",
            "a_min": pre["hu_window"][0],
            "a_max": pre["hu_window"][1],
            "b_min": pre["scaled_range"][0],
            "b_max": pre["scaled_range"][1],
            "clip": True,
        },
    ]
    if pre["crop_foreground"]:
        transforms.append(
            {
                "_target_": "CropForegroundd",
                "keys": "image",
                "source_key": "image",
                "select_fn": f"$lambda x: x > {float(b_min)!r}",
                "allow_smaller": True,
                "start_coord_key": None,
                "end_coord_key": None,
            }
        )
    transforms += [
        {
            "_target_": "SpatialPadd",
            "keys": "image",
            "spatial_size": pre["pad_to"],
            "mode": "constant",
            "value": pre["pad_value"],
        },
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
    ]
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/data'",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii*')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location='cpu')",
        "network": "$@network_def.to(@device).eval()",
        "preprocessing": {"_target_": "Compose", "transforms": transforms},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": sw["roi"],
            "sw_batch_size": sw["sw_batch_size"],
            "overlap": sw["overlap"],
            "mode": sw["blend"],
            "padding_mode": "constant",
            "cval": 0.0,
            "device": "$torch.device('cpu')",
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": True,
                    "to_tensor": True,
                },
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "",
                    "output_ext": ".nii.gz",
                    "output_dtype": "$numpy.uint8",
                    "resample": False,
                    "separate_folder": False,
                    "print_log": False,
                },
            ],
        },
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "amp": False,
        },
        "run": ["$@evaluator.run()"],
    }


def bundle_metadata(settings: dict, provenance: dict, cfg: Config) -> dict:
    import monai

    pre, net = settings["preprocessing"], settings["network"]
    labels = settings["labels"]
    roi = settings["sliding_window"]["roi"]
    method = provenance["pretraining"]["method"]
    arch = "UNETR (medhpm ViT encoder)" if net["architecture"] == "unetr" else "DynUNet (MONAI)"
    return {
        "schema": MONAI_SCHEMA_URL,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by medhpm {__version__} from {Path(provenance['checkpoint']).name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        # what `python -m monai.bundle run` of this bundle needs besides MONAI and torch (pylibjpeg: compressed DICOM)
        "required_packages_version": {p: _version(p) for p in ("nibabel", "pydicom", "pytorch-ignite", "fire")},
        "name": f"medhpm {net['architecture']} CT segmentation",
        "task": f"CT segmentation of {len(labels) - 1} classes ({', '.join(list(labels.values())[1:])})",
        "description": (
            f"{arch} fine-tuned with medhpm; encoder pre-training: {method}. Input: a CT scan "
            f"(NIfTI file or DICOM series folder) reoriented to {pre['orientation']}, resampled to "
            f"{pre['spacing_mm']} mm, HU window {pre['hu_window']} scaled to {pre['scaled_range']}"
            f"{', cropped to the body' if pre['crop_foreground'] else ''}; sliding window of {roi} "
            "voxels; output: a label map in the scan's own geometry."
        ),
        "authors": "medhpm export-model",
        "copyright": "see LICENSE (the exporter's license, if one was given)",
        "intended_use": "research; not for clinical use",
        "data_type": "nibabel and dicom",
        "image_classes": f"one channel: CT in HU, window {pre['hu_window']} scaled to {pre['scaled_range']}",
        "label_classes": ", ".join(f"{k} {v}" for k, v in labels.items()),
        "pred_classes": ", ".join(f"{k} {v}" for k, v in labels.items()),
        "references": [
            "Wang et al., Hard Patches Mining for Masked Image Modeling, CVPR 2023",
            "Hatamizadeh et al., UNETR: Transformers for 3D Medical Image Segmentation, WACV 2022",
        ],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": net["input"]["shape"][1],
                    "spatial_shape": roi,
                    "dtype": "float32",
                    "value_range": pre["scaled_range"],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": net["output"]["shape"][1],
                    "spatial_shape": roi,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": dict(labels),
                }
            },
        },
        "medhpm": {
            **{k: v for k, v in provenance.items() if k != "config"},
            "settings": settings,
            "config": provenance["config"],
        },
        "labels": dict(labels),
        "input_spacing_mm": pre["spacing_mm"],
        "hu_window": pre["hu_window"],
        "architecture": net["architecture"],
        "pretraining_method": method,
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


# The metadata.json mandatory keys and tensor format specifiers of the MONAI Bundle Specification
# (docs.monai.io, "MONAI Bundle Specification"), transcribed as a JSON Schema by medhpm so that
# `python -m monai.bundle verify_metadata` can check a bundle offline (see docs/export.md). Compared with
# MONAI's own meta_schema_20240725.json: the same required top-level keys and types (that schema also
# requires required_packages_version and takes authors as a string only), and stricter tensor entries
# (is_patch_data and channel_def required here, optional there), so what passes here passes there.
_TENSOR = {
    "type": "object",
    "required": [
        "type",
        "format",
        "num_channels",
        "spatial_shape",
        "dtype",
        "value_range",
        "is_patch_data",
        "channel_def",
    ],
    "properties": {
        "type": {"type": "string"},
        "format": {"type": "string"},
        "modality": {"type": "string"},
        "num_channels": {"type": "integer", "minimum": 1},
        "spatial_shape": {"type": "array", "items": {"type": ["integer", "string"]}},
        "dtype": {"type": "string"},
        "value_range": {"type": "array", "items": {"type": "number"}, "maxItems": 2},
        "is_patch_data": {"type": "boolean"},
        "channel_def": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
BUNDLE_METADATA_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "metadata.json of a MONAI bundle (mandatory keys of the MONAI Bundle Specification; medhpm)",
    "type": "object",
    "required": [
        "schema",
        "version",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "required_packages_version",
        "task",
        "description",
        "authors",
        "copyright",
        "network_data_format",
    ],
    "properties": {
        "schema": {"type": "string"},
        "version": {"type": "string"},
        "changelog": {"type": "object", "additionalProperties": {"type": "string"}},
        "monai_version": {"type": "string"},
        "pytorch_version": {"type": "string"},
        "numpy_version": {"type": "string"},
        "required_packages_version": {"type": "object", "additionalProperties": {"type": "string"}},
        "optional_packages_version": {"type": "object", "additionalProperties": {"type": "string"}},
        "task": {"type": "string"},
        "description": {"type": "string"},
        "authors": {"type": "string"},
        "copyright": {"type": "string"},
        "references": {"type": "array", "items": {"type": "string"}},
        "network_data_format": {
            "type": "object",
            "required": ["inputs", "outputs"],
            "properties": {
                "inputs": {"type": "object", "minProperties": 1, "additionalProperties": _TENSOR},
                "outputs": {"type": "object", "minProperties": 1, "additionalProperties": _TENSOR},
            },
        },
    },
}


def bundle_readme(settings: dict, provenance: dict) -> str:
    labels = ", ".join(f"{k} {v}" for k, v in settings["labels"].items())
    pre, sw = settings["preprocessing"], settings["sliding_window"]
    return f"""# medhpm {settings["network"]["architecture"]} CT segmentation (MONAI bundle)

Exported by medhpm {__version__} from `{provenance["checkpoint"]}` (sha256 `{provenance["checkpoint_sha256"]}`);
encoder pre-training: {provenance["pretraining"]["method"]}. Research use only.

Labels: {labels}.

Preprocessing (MONAI transforms in `configs/inference.json`): {"; ".join(pre["steps"])}.
Sliding window: ROI {sw["roi"]}, overlap {sw["overlap"]}, {sw["blend"]} blending. The argmax is inverted to
the scan's own shape and affine (nearest neighbour), as `medhpm predict` does.

## Run

    pip install monai fire pytorch-ignite nibabel pydicom pylibjpeg pylibjpeg-openjpeg
    python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
        --dataset_dir /path/to/niftis --output_dir /path/to/labels

`--datalist "['scan.nii.gz', '/path/to/dicom_series_folder']"` names the scans instead of `--dataset_dir`.
Outputs: `NAME.nii.gz` (uint8 label maps). `models/model.ts` is the network alone (input `(N, 1, {", ".join(map(str, sw["roi"]))})`
after preprocessing, output class logits). Provenance and the full medhpm config: `configs/metadata.json`,
key `medhpm`.

## Verify

    python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath docs/metadata_schema.json
    python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json \\
        --config_file configs/inference.json --bundle_root .

`docs/metadata_schema.json` is medhpm's transcription of the mandatory keys of the MONAI Bundle
Specification (offline); with a `--filepath` that does not exist yet, `verify_metadata` downloads MONAI's
own schema named in `metadata.json` instead.
"""
