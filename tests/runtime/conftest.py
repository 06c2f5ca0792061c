"""Fixtures of the scale and fault tests: a tiny labelled MSD data set written with nibabel."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runtime_helpers import synthetic_case


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """An MSD-style data set of 5 labelled cases (40x40x24 voxels at 3x3x3 mm, int16 HU); returns the
    path of its dataset.json. At 4 mm spacing a case becomes about 30x30x18 voxels, cropped to the body
    and padded to the 32^3 ROI, so a 32^3 crop is the whole (deterministic) volume."""
    import nibabel as nib

    root = tmp_path_factory.mktemp("tiny_msd")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    training = []
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    for i in range(5):
        img, lab = synthetic_case(100 + i)
        name = f"case_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(img, affine), str(root / "imagesTr" / name))
        nib.save(nib.Nifti1Image(lab, affine), str(root / "labelsTr" / name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": "tiny",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "spleen", "6": "liver"},
        "numTraining": len(training),
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root / "dataset.json"


@pytest.fixture(scope="session")
def even_dataset(tiny_dataset) -> Path:
    """The first 4 cases of :func:`tiny_dataset` (same files): a number of volumes that both 1 and 2
    processes split into whole global batches of 2, so DistributedSampler pads nothing."""
    meta = json.loads(tiny_dataset.read_text())
    meta["training"] = meta["training"][:4]
    meta["numTraining"] = 4
    path = tiny_dataset.parent / "dataset_even.json"
    path.write_text(json.dumps(meta, indent=1))
    return path
