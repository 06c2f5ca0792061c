"""report.html in a real browser (headless Chromium, where one is installed): a table wider than the page,
such as the Table-1 layout with surface Dice columns, scrolls inside its own box and the page itself does
not scroll sideways. The test copies the report and appends a script that reads the laid-out widths into
the page title, which ``--dump-dom`` prints."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from medhpm.viz.report import write_report

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome", "chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium or Chrome installed (apt install chromium)")

MEASURE = """<script>
const boxes = Array.from(document.querySelectorAll('table')).map(t => t.parentElement);
document.title = JSON.stringify({page: document.documentElement.scrollWidth, view: window.innerWidth,
  boxes: boxes.map(b => [b.scrollWidth, b.clientWidth])});
</script></body>"""


def _layout(html_path, width: int) -> dict:
    import json

    probe = html_path.with_name("probe.html")
    probe.write_text(html_path.read_text().replace("</body>", MEASURE))
    p = subprocess.run(
        [
            BROWSER,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--window-size={width},900",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    m = re.search(r"<title>(.*?)</title>", p.stdout, re.S)
    assert m and m.group(1).startswith("{"), f"no layout read back: {p.stdout[-500:]} {p.stderr[-500:]}"
    return json.loads(m.group(1).replace("&quot;", '"'))


def test_wide_tables_scroll_in_their_box_not_the_page(tmp_path):
    organs = ["Spleen", "Kidney(R)", "Kidney(L)", "Gallbladder", "Liver", "Stomach", "Aorta", "Pancreas"]
    header = ["Method", "Avg DSC / HD95", *organs, "Avg NSD@1 mm / ASSD", *(f"{o} NSD" for o in organs)]
    row = ["hpm", "86.57 / 5.56", *["88.89"] * 8, "71.20 / 1.31", *["70.01"] * 8]
    md = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(row) + " |"])
    out = write_report(
        tmp_path / "report.html",
        "layout",
        [{"title": "Table 1", "table_md": md}, {"title": "rows", "table": [header, row]}],
    )
    for width in (1280, 800):
        lay = _layout(out, width)
        assert len(lay["boxes"]) == 2
        assert lay["page"] <= lay["view"], f"the page scrolls sideways at {width} px: {lay}"
        for scroll_w, client_w in lay["boxes"]:
            assert scroll_w > client_w, f"the table fits at {width} px, so this test shows nothing: {lay}"
