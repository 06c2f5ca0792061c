"""The table of docs/config.md, written from the declarations of :mod:`medhpm.config.schema`:

python -m medhpm.config.reference docs/config.md
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import MISSING

from medhpm.config.schema import declarations


REFERENCE_BEGIN = "<!-- the table below is written by `python -m medhpm.config.reference docs/config.md` -->"
REFERENCE_END = "<!-- end of the written table -->"


def config_reference() -> str:
    """The markdown table of every key: its default, its rule (empty where validate() checks it with other
    keys, as its meaning says) and its meaning, from :func:`declarations`."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| key | default | rule | meaning |", "|---|---|---|---|"]
    for key, default, rule, help in declarations():
        shown = "set by each stage" if default == MISSING else json.dumps(default)  # as YAML would say it
        rows.append(f"| `{key}` | `{cell(shown)}` | {cell(rule)} | {cell(help)} |")
    return "\n".join(rows) + "\n"


def write_reference(path: str) -> bool:
    """Replace the table between the markers of ``path`` (docs/config.md) with :func:`config_reference`;
    returns whether the file changed."""
    text = Path(path).read_text()
    if REFERENCE_BEGIN + "\n" not in text or REFERENCE_END not in text.split(REFERENCE_BEGIN, 1)[1]:
        raise ValueError(f"{path} lacks the markers {REFERENCE_BEGIN!r} ... {REFERENCE_END!r}")
    head, rest = text.split(REFERENCE_BEGIN + "\n", 1)
    tail = rest.split(REFERENCE_END, 1)[1]
    new = head + REFERENCE_BEGIN + "\n" + config_reference() + REFERENCE_END + tail
    if new != text:
        Path(path).write_text(new)
    return new != text


if __name__ == "__main__":
    import sys

    print("changed" if write_reference(sys.argv[1]) else "up to date")
