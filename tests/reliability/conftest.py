"""Fixtures of the bad-input tests: one good data set and one successful tiny run of each training stage,
shared by every test that needs a real checkpoint (each made once per session, through the command line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rel_helpers import medhpm, tiny, write_cases, write_datalist


@pytest.fixture(scope="session")
def good_data(tmp_path_factory) -> Path:
    """3 labelled cases (48^3 voxels at 3 mm, labels 0/1/2); case c0 is THIN: 48x48x8 voxels, i.e. 36x36x6
    at the 4 mm training spacing, smaller than the 32^3 ROI along z only. Returns the datalist."""
    root = tmp_path_factory.mktemp("good")
    entries = write_cases(root, 3)
    write_cases(root / "thin", 1, shape=(48, 48, 8))  # thin/imagesTr/c0.nii.gz, thin/labelsTr/c0.nii.gz
    entries[0] = {"image": "thin/imagesTr/c0.nii.gz", "label": "thin/labelsTr/c0.nii.gz", "case": "thin"}
    return write_datalist(root, entries)


@pytest.fixture(scope="session")
def pretrain_run(good_data, tmp_path_factory):
    """(run folder, finished process) of ``medhpm pretrain`` on :func:`good_data` (1 epoch, micro ViT)."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    res = medhpm("pretrain", *tiny(good_data), "--out", out)
    return out, res


@pytest.fixture(scope="session")
def finetune_run(good_data, pretrain_run, tmp_path_factory):
    """(run folder, finished process) of ``medhpm finetune --init <pretrain final.pt>`` (1 epoch, 3 classes)."""
    out = tmp_path_factory.mktemp("finetune") / "run"
    init = pretrain_run[0] / "final.pt"
    res = medhpm("finetune", *tiny(good_data), "--init", init, "--out", out)
    assert res.returncode == 0, res.stdout + res.stderr
    return out, res
