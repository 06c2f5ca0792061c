"""``runtime.checkpoint.load_checkpoint``: the one checkpoint reader; every error names the file."""

from __future__ import annotations

import pytest
import torch

from medhpm.config import CHECKPOINT_KEYS
from medhpm.config import checkpoint_keys
from medhpm.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _ckpt(tmp_path, name="final.pt", **entries):
    state = {
        "format": "medhpm-checkpoint",
        "stage": "pretrain",
        "model": {"w": torch.ones(2)},
        "epoch": 0,
        "config": {},
        "model_args": {},
    }
    state.update(entries)
    return save_checkpoint(state, tmp_path / name)


def _error(path, **kw) -> str:
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, **kw)
    assert str(path) in str(err.value), err.value
    return str(err.value)


def test_reads_a_file_or_a_run_folder(tmp_path):
    path = _ckpt(tmp_path, "last.pt")
    assert load_checkpoint(path, stage="pretrain")["model"]["w"].tolist() == [1.0, 1.0]
    assert load_checkpoint(tmp_path)["stage"] == "pretrain"  # the folder's last.pt
    torch.save({"vit.patch_embedding.x": torch.zeros(1)}, tmp_path / "foreign.pth")
    assert list(load_checkpoint(tmp_path / "foreign.pth")) == ["vit.patch_embedding.x"]  # no stage: any dict


def test_missing_damaged_and_foreign_files(tmp_path):
    assert "does not exist" in _error(tmp_path / "nope.pt")
    assert "without last.pt" in _error(tmp_path)
    cut = _ckpt(tmp_path)
    cut.write_bytes(cut.read_bytes()[:100])
    assert "unreadable or truncated" in _error(cut)
    torch.save([1, 2], tmp_path / "list.pt")
    assert "holds a list" in _error(tmp_path / "list.pt")
    torch.save({"weight": torch.ones(1)}, tmp_path / "sd.pt")
    assert "not a medhpm checkpoint" in _error(tmp_path / "sd.pt", stage="finetune")


def test_stage_and_required_entries(tmp_path):
    path = _ckpt(tmp_path, teacher=None)
    msg = _error(path, stage="finetune", purpose="prediction needs a fine-tuning checkpoint")
    assert "is a 'pretrain' checkpoint" in msg and "prediction needs a fine-tuning checkpoint" in msg
    assert "lacks teacher" in _error(path, stage="pretrain", keys=("model", "teacher"))
    bad = _ckpt(tmp_path, "bad.pt", config="not a dict")
    assert "lacks config" in _error(bad, stage="pretrain", keys=("config",))


def test_checkpoint_keys_leave_out_the_other_stage():
    ft, pt = checkpoint_keys("finetune"), checkpoint_keys("pretrain")
    assert set(ft) | set(pt) == set(CHECKPOINT_KEYS)
    assert "finetune.num_classes" in ft and "pretrain.method" not in ft and "model.decoder_dim" not in ft
    assert "pretrain.method" in pt and "model.feature_size" not in pt and "finetune.num_classes" not in pt
    assert {"model.preset", "data.spacing", "data.a_max"} <= set(ft) & set(pt)
