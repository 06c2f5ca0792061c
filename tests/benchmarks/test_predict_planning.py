"""The planning benchmark times the product's plan_predictions on folders of real NIfTI files."""

from __future__ import annotations

import json

from benchmarks.predict_planning import main


def test_predict_planning_writes_a_time_per_size_and_the_ratios(tmp_path, capsys):
    out = tmp_path / "planning.json"
    main(["--sizes", "8", "4", "--repeats", "2", "-o", str(out)])
    res = json.loads(out.read_text())
    assert res["sizes"] == [4, 8] and res["size_ratio_to_first"] == {"4": 1.0, "8": 2.0}
    assert all(len(v) == 2 and all(t > 0 for t in v) for v in res["seconds_all"].values())
    assert res["time_ratio_to_first"]["4"] == 1.0 and res["time_ratio_to_first"]["8"] > 0
    assert json.loads(capsys.readouterr().out) == res
