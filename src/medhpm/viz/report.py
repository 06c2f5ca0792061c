"""Training curves and the self-contained HTML report (PNG figures embedded as data URIs)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import cast

from medhpm.runtime.files import atomic_write_text, save_png
from medhpm.runtime.logging import read_metrics


# the pre-training diagnostics of medhpm.pretrain.diagnostics, in [0, 1] (the rank correlations in [-1, 1])
_MINING_CURVES = (
    ("teacher_init_share", "teacher: random-init share"),
    ("student_rank_acc", "student lp: pair accuracy"),
    ("student_spearman", "student lp: Spearman"),
    # drawn after the student's, dashed: with masked views the teacher's curves lie on the student's
    ("teacher_rank_acc", "teacher scores: pair accuracy"),
    ("teacher_spearman", "teacher scores: Spearman"),
    ("organ_share_hard", "mined patches with organ"),
    ("organ_share_random", "random masked with organ"),
)


def curves_figure(runs: dict[str, Path], out_png: str | Path, title: str = "training curves") -> Path:
    """Plot per-epoch losses (and validation Dice and the teacher's mining diagnostics when present) of
    several run folders side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = []  # (title, [(label, xs, ys)])
    for name, run in runs.items():
        recs = [r for r in read_metrics(Path(run) / "metrics.jsonl") if r.get("kind") == "epoch"]
        if not recs:
            continue
        xs = [r["epoch"] + 1 for r in recs]
        lines = []
        for key in ("loss_rec", "loss_pred", "loss"):
            ys = [r.get(key) for r in recs]
            if any(y is not None for y in ys) and not (key == "loss" and "loss_rec" in recs[0]):
                lines.append((key, xs, ys))
        panels.append((f"{name}: losses", lines, "loss"))
        mining = [
            (label, xs, [r.get(key) for r in recs])
            for key, label in _MINING_CURVES
            if any(r.get(key) is not None for r in recs)
        ]
        if mining:
            panels.append((f"{name}: teacher and mining", mining, "share / accuracy / correlation"))
        val = [(r["epoch"] + 1, r["val_dice"]) for r in recs if r.get("val_dice") is not None]
        if val:
            panels.append(
                (
                    f"{name}: validation Dice",
                    [("val Dice (reported organs)", [v[0] for v in val], [v[1] for v in val])],
                    "Dice",
                )
            )
    if not panels:
        raise ValueError("no epoch records found in the given run folders")
    crowded = any(len(lines) > 4 for _, lines, _ in panels)  # the mining panel: its legend goes below it
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4 if crowded else 3.2), squeeze=False)
    for ax, (t, lines, ylab) in zip(axes[0], panels):
        for label, xs, ys in lines:
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker="o",
                    ms=3,
                    label=label,
                    linestyle="--" if label.startswith("teacher scores") else "-",
                )
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers: no 1.2, 1.4 ticks
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3)
        if len(lines) > 4:  # below the axes, so that no line hides behind it
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
        else:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_png(fig, out_png)


def grid_figure(
    series: dict[str, list[tuple[object, float, float]]],
    out_png: str | Path,
    xlabel: str,
    ylabel: str = "mean Dice (reported organs, %)",
    title: str = "",
) -> Path:
    """One line per method of ``(grid value, mean, std)`` points with ``std`` error bars (NaN std: none).

    Numeric grid values are placed at their value; otherwise the values stand at equal steps in the
    order given. Methods are offset a little sideways so that their error bars do not hide each other."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = list(dict.fromkeys(v for pts in series.values() for v, _, _ in pts))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xs = {v: float(cast(float, v)) if numeric else float(i) for i, v in enumerate(values)}
    span = (max(xs.values()) - min(xs.values())) or 1.0
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (name, pts) in enumerate(series.items()):
        shift = (i - (len(series) - 1) / 2) * 0.012 * span
        x = [xs[v] + shift for v, _, _ in pts]
        y = [m for _, m, _ in pts]
        err = [0.0 if not math.isfinite(s) else s for _, _, s in pts]
        ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, label=name)
    ax.set_xticks([xs[v] for v in values])
    ax.set_xticklabels([str(v) for v in values])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, out_png)


def curve_figure(
    methods: dict[str, dict], floor: dict, out_png: str | Path, probes=("linear_cv", "knn"), title: str = ""
) -> Path:
    """Probe scores against pre-training steps: one panel per probe of ``probes`` (balanced accuracy in %,
    log-scaled steps), a line per (method, pre-training seed), the noise ``floor`` as a band (mean ± std)
    with its max dotted; a last panel with each pre-training's training reconstruction loss per epoch and,
    where measured (``heldout_loss``, None elsewhere), its loss on the test scans at each snapshot.

    ``methods``: label -> {pre-training seed: {"steps": [...], PROBE: [...], "loss_rec": [[step, loss]]}};
    ``floor``: PROBE -> {"mean", "std", "max"}."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(probes) + 1, figsize=(4.2 * (len(probes) + 1), 3.9))
    names = {"linear_cv": "cross-validated linear probe", "knn": "kNN probe", "linear_fixed": "fixed linear probe"}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, probe in zip(axes, probes):
        f = floor[probe]
        sd = f["std"] if f.get("std") is not None and math.isfinite(f["std"]) else 0.0
        ax.axhspan(100 * (f["mean"] - sd), 100 * (f["mean"] + sd), color="0.85", label="random init (mean ± std)")
        ax.axhline(100 * f["max"], color="0.5", ls=":", lw=1, label="random init (max)")
        for i, (label, seeds) in enumerate(methods.items()):
            for j, (seed, e) in enumerate(seeds.items()):
                ax.plot(
                    e["steps"],
                    [100 * v for v in e[probe]],
                    marker="o",
                    ms=3,
                    color=colours[i % len(colours)],
                    ls="-" if j == 0 else "--",
                    label=label if j == 0 else None,
                )
        ax.set_xscale("log")
        ax.set_xlabel("pre-training optimizer steps")
        ax.set_ylabel("balanced accuracy on test cases (%)")
        ax.set_title(names.get(probe, probe), fontsize=10)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    held_any = False
    for i, (label, seeds) in enumerate(methods.items()):
        for j, e in enumerate(seeds.values()):
            if e.get("loss_rec"):
                st, lo = zip(*e["loss_rec"])
                ax.plot(
                    st,
                    lo,
                    color=colours[i % len(colours)],
                    ls="-" if j == 0 else "--",
                    lw=1,
                    label=label if j == 0 else None,
                )
            held = [(s_, v) for s_, v in zip(e["steps"], e.get("heldout_loss") or []) if v is not None]
            if held:
                held_any = True
                ax.plot(*zip(*held), color=colours[i % len(colours)], ls=":", marker="s", ms=4)
    ax.set_xscale("log")
    ax.set_xlabel("pre-training optimizer steps")
    ax.set_ylabel("reconstruction loss")
    ax.set_title("pretext loss: training (lines)" + (", test scans (squares)" if held_any else ""), fontsize=10)
    ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return save_png(fig, out_png)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _table_html(rows: list[list]) -> str:
    """Rows (the first is the header) as an HTML table in a box that scrolls sideways when it is too wide."""
    cells = lambda row, tag: "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in row)  # noqa: E731
    return (
        "<div class='wide'><table>\n"
        + "\n".join(f"<tr>{cells(row, 'th' if i == 0 else 'td')}</tr>" for i, row in enumerate(rows))
        + "\n</table></div>"
    )


def _md_table_to_html(md: str) -> str:
    rows = [r.strip() for r in md.strip().splitlines() if r.strip().startswith("|")]
    rows = [r for r in rows if not set(r.replace("|", "").strip()) <= set("-: ")]
    if not rows:
        return f"<pre>{html.escape(md)}</pre>"
    return _table_html([[c.strip() for c in r.strip("|").split("|")] for r in rows])


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3}td{white-space:nowrap}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.8em}.note{color:#555;font-size:.9em}
details{margin:.4em 0}.wide{overflow-x:auto;max-width:100%}
"""


def write_report(out_html: str | Path, title: str, sections: list[dict]) -> Path:
    """Write one self-contained HTML page.

    ``sections``: dicts with ``title`` and any of ``text`` (paragraph), ``table_md`` (Markdown table),
    ``table`` (list of rows, first row the header), ``images`` (list of (path, caption)), ``pre`` (text
    shown verbatim, e.g. a config), ``details`` (list of (summary, pre-text)).
    """
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
    ]
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec['title'])}</h2>")
        if sec.get("text"):
            parts.append(f"<p>{html.escape(sec['text'])}</p>")
        if sec.get("table_md"):
            parts.append(_md_table_to_html(sec["table_md"]))
        if sec.get("table"):
            parts.append(_table_html(sec["table"]))
        for path, cap in sec.get("images", []):
            if Path(path).exists():
                parts.append(_img(Path(path), cap))
        if sec.get("pre"):
            parts.append(f"<pre>{html.escape(sec['pre'])}</pre>")
        for summary, text in sec.get("details", []):
            parts.append(f"<details><summary>{html.escape(summary)}</summary><pre>{html.escape(text)}</pre></details>")
        if sec.get("note"):
            parts.append(f"<p class='note'>{html.escape(sec['note'])}</p>")
    parts.append("</body></html>")
    return atomic_write_text(out_html, "\n".join(parts))
