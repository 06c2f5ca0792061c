"""The frozen-encoder probe of a run (segment/encoder_probe.py) on real phantom files: the encoder it probes is the
one fine-tuning starts from, the cases are fine-tuning's, the cross-validation folds are those cases, a
finished probe.json is read back, and the noise floor probes random initialisations on the same cases."""

from __future__ import annotations

import json
import statistics

import pytest

import torch

from medhpm.config import load_config
from medhpm.data.datalist import load_datalist
from medhpm.segment.encoder_probe import probe_encoder, run_noise_floor, run_probe
from medhpm.segment.trainer import FinetuneTrainer

from pipeline_settings import TINY


def _cfg(dataset, *more):
    return load_config("demo", TINY + [f"data.dataset={dataset}", "runtime.threads=1", *more])


def test_the_scratch_probe_encoder_is_fine_tunings_random_init(tiny_phantoms, tmp_path):
    cfg = _cfg(tiny_phantoms, "seed=3")
    trainer = FinetuneTrainer(cfg, tmp_path / "ft", init=None)
    trainer.setup()  # seeds, builds the data and the model exactly as a fine-tuning run from scratch does
    want = trainer.model.encoder.state_dict()
    got = probe_encoder(cfg).state_dict()
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    other = probe_encoder(_cfg(tiny_phantoms, "seed=4")).state_dict()
    assert not torch.equal(other["patch_embed.proj.weight"], got["patch_embed.proj.weight"])


def test_run_probe_uses_fine_tunings_labelled_cases_and_is_read_back(tiny_phantoms, tmp_path):
    cfg = _cfg(tiny_phantoms, "seed=1", "finetune.labelled_cases=2")
    out = tmp_path / "probe.json"
    res = run_probe(cfg, tiny_phantoms, out)
    assert 0.0 <= res["balanced_accuracy"] <= 1.0 and 0.0 < res["chance"] <= 1.0
    dl = load_datalist(tiny_phantoms)
    test_cases = [e["case"] for e in dl["test"]]
    assert res["test_cases"] == test_cases
    assert len(res["training_cases"]) == 2 and not set(res["training_cases"]) & set(test_cases)
    assert not set(res["training_cases"]) & {e["case"] for e in dl["validation"]}
    trainer = FinetuneTrainer(cfg, tmp_path / "ft", init=None)
    trainer.setup()
    assert res["training_cases"] == [e["case"] for e in trainer.train_entries]  # the cases fine-tuning learns from
    # every token of the 32^3 windows: (ceil of each axis / 32) windows of (32 / 8)^3 tokens per case
    assert res["train_tokens"] % 64 == 0 and res["token_dim"] == 96
    # the fixed-strength probe of old keeps its fields; the cross-validated linear and kNN probes come beside it
    assert res["weight_decay"] == 1e-3 and 0.0 <= res["train_balanced_accuracy"] <= 1.0
    lin, knn = res["linear_cv"], res["knn"]
    for rec, key in ((lin, "weight_decay"), (knn, "k")):
        assert 0.0 <= rec["balanced_accuracy"] <= 1.0 and set(rec["test_recall"]) <= {str(c) for c in range(14)}
        cv = rec["cv"]
        curve = cv["balanced_accuracy"]
        assert rec[key] == cv[key][max(i for i, v in enumerate(curve) if v == max(curve))]  # the argmax
        # two labelled cases: leave-one-case-out, each fold one training case
        assert cv["folds"] == 2 and sorted(map(tuple, cv["fold_cases"])) == sorted((c,) for c in res["training_cases"])
    assert lin["cv"]["weight_decay"] == [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0] and knn["cv"]["k"] == [5, 10, 20]
    assert 0.0 <= lin["train_balanced_accuracy"] <= 1.0 and knn["distance"] == "cosine"
    # a finished probe.json is read back, not recomputed
    data = json.loads(out.read_text())
    data["balanced_accuracy"] = 0.123
    out.write_text(json.dumps(data))
    assert run_probe(cfg, tiny_phantoms, out)["balanced_accuracy"] == 0.123
    all_cases = run_probe(replace_k(cfg, 0), tiny_phantoms, tmp_path / "all.json")
    assert len(all_cases["training_cases"]) == all_cases["training_cases_available"] == len(dl["training"])


def replace_k(cfg, k):
    from dataclasses import replace

    return replace(cfg, finetune=replace(cfg.finetune, labelled_cases=k))


def test_noise_floor_probes_random_inits_on_the_same_cases(tiny_phantoms, tmp_path):
    cfg = _cfg(tiny_phantoms, "seed=1", "finetune.labelled_cases=2")
    scratch = run_probe(cfg, tiny_phantoms, tmp_path / "probe.json")
    out = tmp_path / "floor.json"
    floor = run_noise_floor(cfg, tiny_phantoms, out, seeds=[1, 5])
    assert floor["seeds"] == [1, 5] and floor["training_cases"] == scratch["training_cases"]
    assert floor["train_tokens"] == scratch["train_tokens"] and floor["cases_seed"] == 1
    # the random init with seed 1 on cfg's cases is exactly what the scratch probe with seed 1 probes
    for name in ("linear_cv", "knn"):
        assert floor["per_seed"]["1"][name]["balanced_accuracy"] == pytest.approx(scratch[name]["balanced_accuracy"])
        assert floor["per_seed"]["1"][name]["cv"]["fold_cases"] == scratch[name]["cv"]["fold_cases"]
        s = floor["summary"][name]
        vals = [floor["per_seed"][k][name]["balanced_accuracy"] for k in ("1", "5")]
        assert s["values"] == vals and s["mean"] == pytest.approx(statistics.mean(vals))
        assert s["std"] == pytest.approx(statistics.stdev(vals)) and s["n"] == 2
    assert floor["summary"]["linear_fixed"]["values"][0] == pytest.approx(scratch["balanced_accuracy"])
    # read back with the same seeds, recomputed with others
    data = json.loads(out.read_text())
    data["summary"]["knn"]["mean"] = 0.5
    out.write_text(json.dumps(data))
    assert run_noise_floor(cfg, tiny_phantoms, out, seeds=[1, 5])["summary"]["knn"]["mean"] == 0.5
    assert run_noise_floor(cfg, tiny_phantoms, out, seeds=[5])["summary"]["knn"]["n"] == 1
