"""The training-curve figure of report.html draws the teacher's mining diagnostics when a run logged them."""

from __future__ import annotations

import json

import matplotlib.image as mpimg

from medhpm.viz.report import curves_figure


def _run(folder, with_mining: bool):
    folder.mkdir()
    lines = []
    for e in range(3):
        rec = {"kind": "epoch", "epoch": e, "loss_rec": 1.0 - 0.1 * e, "loss_pred": 0.69 - 0.01 * e}
        if with_mining:
            rec.update(
                teacher_init_share=0.5 ** (e + 1),
                teacher_rank_acc=0.5 + 0.05 * e,
                student_rank_acc=0.55 + 0.05 * e,
                organ_share_hard=0.6,
                organ_share_random=0.45,
            )
        lines.append(json.dumps(rec))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_mining_panel_only_for_runs_that_logged_it(tmp_path):
    mae = curves_figure({"mae": _run(tmp_path / "mae", False)}, tmp_path / "mae.png")
    hpm = curves_figure({"hpm": _run(tmp_path / "hpm", True)}, tmp_path / "hpm.png")
    w_mae, w_hpm = mpimg.imread(str(mae)).shape[1], mpimg.imread(str(hpm)).shape[1]
    # one panel each is 4.2 inches at 90 dpi: the hpm figure has a second one (teacher and mining)
    assert abs(w_mae - 378) <= 2 and abs(w_hpm - 756) <= 2, (w_mae, w_hpm)
