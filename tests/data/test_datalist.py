"""Datalist readers on layouts built by the tests (files are tiny placeholders unless read)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from medhpm.data.datalist import (
    DataError,
    load_datalist,
    read_btcv,
    read_folder,
    read_msd,
    read_nnunet,
    split_validation,
    write_datalist,
)
from medhpm.data.labels import BTCV13, BTCV_LABELS, PROTOCOL_ORGANS

TRANSUNET_TRAIN = [5, 6, 7, 9, 10, 21, 23, 24, 26, 27, 28, 30, 31, 33, 34, 37, 39, 40]
TRANSUNET_TEST = [1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38]


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def paths(entries, key="image"):
    return [e[key] for e in entries]


# --------------------------------------------------------------------------------------------------
# MSD


def make_msd(root: Path, **extra) -> Path:
    for name in ("a", "b", "c"):
        touch(root / "imagesTr" / f"{name}.nii.gz")
        touch(root / "labelsTr" / f"{name}.nii.gz")
    touch(root / "imagesTs" / "t1.nii.gz")
    obj = {
        "name": "Toy",
        "labels": {"0": "background", "1": "organ", "2": "bone"},
        "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in ("a", "b")],
        "validation": [{"image": "imagesTr/c.nii.gz", "label": "labelsTr/c.nii.gz"}],
        "test": ["./imagesTs/t1.nii.gz"],
        **extra,
    }
    (root / "dataset.json").write_text(json.dumps(obj))
    return root / "dataset.json"


def test_read_msd_resolves_relative_paths_and_plain_string_entries(tmp_path):
    dl = read_msd(make_msd(tmp_path))
    assert dl["format"] == "msd" and dl["name"] == "Toy"
    assert dl["labels"] == {0: "background", 1: "organ", 2: "bone"}
    assert paths(dl["training"]) == [str(tmp_path / "imagesTr" / "a.nii.gz"), str(tmp_path / "imagesTr" / "b.nii.gz")]
    assert paths(dl["training"], "label")[1] == str(tmp_path / "labelsTr" / "b.nii.gz")
    assert [e["case"] for e in dl["validation"]] == ["c"]
    assert dl["test"] == [{"image": str(tmp_path / "imagesTs" / "t1.nii.gz"), "case": "t1"}]
    assert all(os.path.isabs(e["image"]) for s in ("training", "validation", "test") for e in dl[s])


def test_read_msd_accepts_name_to_value_labels(tmp_path):
    dl = read_msd(make_msd(tmp_path, labels={"background": 0, "liver": 6}))
    assert dl["labels"] == {0: "background", 6: "liver"}


def test_msd_missing_files_are_listed_with_the_datalist_name(tmp_path):
    js = make_msd(tmp_path)
    (tmp_path / "imagesTr" / "b.nii.gz").unlink()
    (tmp_path / "labelsTr" / "c.nii.gz").unlink()
    with pytest.raises(DataError) as e:
        read_msd(js)
    msg = str(e.value)
    assert str(js) in msg and "b.nii.gz" in msg and "c.nii.gz" in msg and "2 referenced" in msg
    # the data check reads with check_paths=False and reports them per file instead
    assert len(read_msd(js, check_paths=False)["training"]) == 2


def test_msd_relative_path_escaping_the_folder_is_an_error(tmp_path):
    outside = touch(tmp_path / "elsewhere" / "x.nii.gz")
    root = tmp_path / "ds"
    js = make_msd(root, test=["../elsewhere/x.nii.gz"])
    with pytest.raises(DataError) as e:
        read_msd(js)
    assert str(js) in str(e.value) and "../elsewhere/x.nii.gz" in str(e.value) and "lead out" in str(e.value)
    # the same file given as an absolute path is allowed
    js = make_msd(root, test=[str(outside)])
    assert paths(read_msd(js)["test"]) == [str(outside)]


def test_msd_absolute_path_must_exist(tmp_path):
    js = make_msd(tmp_path, test=[str(tmp_path / "nowhere.nii.gz")])
    with pytest.raises(DataError, match="nowhere.nii.gz"):
        read_msd(js)


def test_msd_empty_training_is_an_error(tmp_path):
    js = make_msd(tmp_path, training=[])
    with pytest.raises(DataError, match="no training cases"):
        read_msd(js)


def test_msd_bad_json_and_multichannel_are_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_msd(bad)
    js = make_msd(tmp_path / "mc", modality={"0": "FLAIR", "1": "T1w"})
    with pytest.raises(DataError, match="single-channel"):
        read_msd(js)


def test_duplicate_file_names_get_distinct_case_names(tmp_path):
    for c in ("p1", "p2"):
        touch(tmp_path / c / "ct.nii.gz")
    js = tmp_path / "list.json"
    js.write_text(json.dumps({"training": [{"image": "p1/ct.nii.gz"}, {"image": "p2/ct.nii.gz"}]}))
    cases = [e["case"] for e in read_msd(js)["training"]]
    assert len(set(cases)) == 2


# --------------------------------------------------------------------------------------------------
# nnU-Net


def make_nnunet(root: Path, channels=None, num=None) -> Path:
    for c in ("case_001", "case_002"):
        touch(root / "imagesTr" / f"{c}_0000.nii.gz")
        touch(root / "labelsTr" / f"{c}.nii.gz")
    touch(root / "imagesTs" / "case_101_0000.nii.gz")
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": channels or {"0": "CT"},
                "labels": {"background": 0, "liver": 1, "tumour": 2},
                "numTraining": 2 if num is None else num,
                "file_ending": ".nii.gz",
            }
        )
    )
    return root


def test_read_nnunet(tmp_path):
    dl = read_nnunet(make_nnunet(tmp_path))
    assert dl["format"] == "nnunet"
    assert dl["labels"] == {0: "background", 1: "liver", 2: "tumour"}
    assert [e["case"] for e in dl["training"]] == ["case_001", "case_002"]
    assert dl["training"][0]["image"].endswith("imagesTr/case_001_0000.nii.gz")
    assert dl["training"][0]["label"].endswith("labelsTr/case_001.nii.gz")
    assert [e["case"] for e in dl["test"]] == ["case_101"] and "label" not in dl["test"][0]


def test_nnunet_multichannel_is_a_clear_error(tmp_path):
    root = make_nnunet(tmp_path, channels={"0": "CT", "1": "PET"})
    with pytest.raises(DataError, match="single-channel CT"):
        read_nnunet(root)


def test_nnunet_wrong_num_training_is_an_error(tmp_path):
    with pytest.raises(DataError, match="numTraining"):
        read_nnunet(make_nnunet(tmp_path, num=5))


# --------------------------------------------------------------------------------------------------
# BTCV


def make_btcv(root: Path, ids) -> Path:
    base = root / "RawData" / "Training"
    for i in ids:
        touch(base / "img" / f"img{i:04d}.nii.gz")
        touch(base / "label" / f"label{i:04d}.nii.gz")
    return root


def test_btcv_transunet_split(tmp_path):
    dl = read_btcv(make_btcv(tmp_path, TRANSUNET_TRAIN + TRANSUNET_TEST), split="transunet")
    assert dl["split"] == "transunet"
    assert [e["case"] for e in dl["training"]] == [f"img{i:04d}" for i in TRANSUNET_TRAIN]
    assert [e["case"] for e in dl["test"]] == [f"img{i:04d}" for i in TRANSUNET_TEST]
    assert dl["validation"] == []
    assert dl["labels"][6] == "liver" and len(dl["labels"]) == 14
    assert all(e["label"].endswith(e["case"].replace("img", "label") + ".nii.gz") for e in dl["training"])


def test_btcv_monai_split(tmp_path):
    ids = list(range(1, 11)) + list(range(21, 41))
    dl = load_datalist(make_btcv(tmp_path, ids), split="monai")
    assert dl["format"] == "btcv" and dl["split"] == "monai"
    assert len(dl["training"]) == 24 and len(dl["validation"]) == 6 and dl["test"] == []
    assert [e["case"] for e in dl["validation"]] == [f"img{i:04d}" for i in range(35, 41)]
    train_ids = {int(e["case"][3:]) for e in dl["training"]}
    assert train_ids == set(range(1, 11)) | set(range(21, 35))


def test_btcv_missing_cases_are_listed(tmp_path):
    ids = [i for i in TRANSUNET_TRAIN + TRANSUNET_TEST if i not in (7, 22)]
    with pytest.raises(DataError) as e:
        read_btcv(make_btcv(tmp_path, ids), split="transunet")
    assert "img0007" in str(e.value) and "label0022" in str(e.value)


def test_btcv_labels_are_the_13_organs():
    assert BTCV_LABELS[1] == "spleen" and BTCV_LABELS[11] == "pancreas" and BTCV_LABELS[13] == "left adrenal gland"


def test_one_btcv_label_table_serves_data_evaluation_and_phantoms(tmp_path):
    from medhpm.data import phantom
    from medhpm.evaluate import classes

    assert set(BTCV13) == set(BTCV_LABELS) - {0} == set(range(1, 14))
    assert classes.BTCV13 is BTCV13 and phantom.BTCV_LABELS is BTCV_LABELS
    assert classes.BTCV8 == {v: BTCV13[v] for v in PROTOCOL_ORGANS} and phantom.PROTOCOL_ORGANS is PROTOCOL_ORGANS
    btcv = make_btcv(tmp_path, TRANSUNET_TRAIN + TRANSUNET_TEST)
    assert read_btcv(btcv)["labels"] == BTCV_LABELS


# --------------------------------------------------------------------------------------------------
# Plain folder, with a DICOM series


def test_read_folder_finds_nifti_and_dicom_series(tmp_path, dicom_series_writer, synthetic_ct):
    touch(tmp_path / "a.nii.gz")
    touch(tmp_path / "sub" / "b.nii")
    touch(tmp_path / "notes.txt")
    vol, _ = synthetic_ct((12, 10, 4))
    dicom_series_writer(tmp_path / "patient1" / "series", vol)  # extension-less DICOM files
    dl = read_folder(tmp_path)
    assert dl["format"] == "folder" and dl["labels"] == {}
    imgs = sorted(paths(dl["training"]))
    assert imgs == sorted(
        [str(tmp_path / "a.nii.gz"), str(tmp_path / "sub" / "b.nii"), str(tmp_path / "patient1" / "series")]
    )
    assert all("label" not in e for e in dl["training"])
    assert dl["validation"] == [] and dl["test"] == []
    assert load_datalist(tmp_path)["format"] == "folder"


def test_read_folder_that_is_itself_a_series(tmp_path, dicom_series_writer, synthetic_ct):
    vol, _ = synthetic_ct((12, 10, 4))
    dicom_series_writer(tmp_path / "ser", vol, suffix=".dcm")
    dl = load_datalist(tmp_path / "ser")
    assert paths(dl["training"]) == [str(tmp_path / "ser")]


def test_read_folder_follows_symlinks_without_looping(tmp_path):
    touch(tmp_path / "real" / "x.nii.gz")
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "linked").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "scans" / "linked_loop").symlink_to(tmp_path / "scans", target_is_directory=True)
    dl = read_folder(tmp_path / "scans")
    assert paths(dl["training"]) == [str(tmp_path / "scans" / "linked" / "x.nii.gz")]


def test_empty_folder_is_an_error(tmp_path):
    touch(tmp_path / "readme.txt")
    with pytest.raises(DataError, match="no NIfTI"):
        read_folder(tmp_path)


# --------------------------------------------------------------------------------------------------
# Dispatch, writing, validation split


def test_auto_detection(tmp_path):
    assert load_datalist(make_msd(tmp_path / "m"))["format"] == "msd"
    assert load_datalist(tmp_path / "m")["format"] == "msd"  # MSD task folder: dataset.json lists cases
    assert load_datalist(make_nnunet(tmp_path / "n"))["format"] == "nnunet"
    ids = TRANSUNET_TRAIN + TRANSUNET_TEST
    assert load_datalist(make_btcv(tmp_path / "b", ids))["format"] == "btcv"
    with pytest.raises(DataError, match="no such file"):
        load_datalist(tmp_path / "missing")


def test_write_datalist_round_trip(tmp_path):
    dl = load_datalist(make_btcv(tmp_path / "btcv", TRANSUNET_TRAIN + TRANSUNET_TEST))
    out = write_datalist(dl, tmp_path / "dataset.json")
    raw = json.loads(out.read_text())
    assert raw["training"][0]["image"] == "btcv/RawData/Training/img/img0005.nii.gz"  # relative inside
    again = read_msd(out)
    assert again["split"] == "transunet"  # which split it was made from travels with it
    for split in ("training", "validation", "test"):
        assert again[split] == dl[split]
    assert again["labels"] == dl["labels"]
    # a datalist written elsewhere keeps absolute paths (a relative one would have to leave its folder)
    out2 = write_datalist(dl, tmp_path / "other" / "list.json")
    assert os.path.isabs(json.loads(out2.read_text())["test"][0]["image"])
    assert read_msd(out2)["test"] == dl["test"]


def test_split_validation_is_deterministic_and_from_training_only(tmp_path):
    entries = [{"image": f"/d/{i}.nii.gz", "case": f"c{i:02d}"} for i in range(18)]
    tr, va = split_validation(entries, 3, seed=0)
    assert len(tr) == 15 and len(va) == 3
    assert {e["case"] for e in tr} | {e["case"] for e in va} == {e["case"] for e in entries}
    assert not ({e["case"] for e in tr} & {e["case"] for e in va})
    # independent of the listing order, dependent on the seed
    tr2, va2 = split_validation(list(reversed(entries)), 3, seed=0)
    assert sorted(e["case"] for e in va2) == sorted(e["case"] for e in va)
    picks = {tuple(sorted(e["case"] for e in split_validation(entries, 3, seed=s)[1])) for s in range(6)}
    assert len(picks) > 1
    assert split_validation(entries, 0, seed=0) == (entries, [])
    with pytest.raises(DataError, match="at least one"):
        split_validation(entries[:2], 2, seed=0)


def test_datalist_reads_real_dicom_entry(tmp_path, real_abdomen_dicom):
    dicom, labels = real_abdomen_dicom
    js = tmp_path / "list.json"
    js.write_text(json.dumps({"training": [{"image": str(dicom), "label": str(labels)}]}))
    dl = read_msd(js)
    assert dl["training"][0] == {"image": str(dicom.absolute()), "label": str(labels.absolute()), "case": "dicom"}


def test_labelled_cases_are_k_training_cases_chosen_by_seed():
    from medhpm.data.datalist import choose_labelled

    entries = [{"image": f"/d/{i}.nii.gz", "case": f"c{i:02d}"} for i in range(12)]
    train, val = split_validation(entries, 2, seed=0)
    for k in (1, 3, 10):
        chosen = choose_labelled(train, k, seed=0)
        assert len(chosen) == k and {e["case"] for e in chosen} <= {e["case"] for e in train}
        assert not {e["case"] for e in chosen} & {e["case"] for e in val}  # never a validation case
        # the choice depends on the case names and the seed, not on the listing order
        assert {e["case"] for e in chosen} == {e["case"] for e in choose_labelled(train[::-1], k, seed=0)}
    # the same seed, the same cases (every method of a seed learns from the same labels); seeds differ
    picks = {frozenset(e["case"] for e in choose_labelled(train, 3, seed=s)) for s in range(6)}
    assert len(picks) > 1
    assert choose_labelled(train, 0, seed=0) == train
    with pytest.raises(DataError, match="finetune.labelled_cases"):
        choose_labelled(train, 11, seed=0)
