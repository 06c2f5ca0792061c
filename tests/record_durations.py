"""Record each test's duration from a full run's JUnit XML into ``tests/durations.json``, which
``conftest.py`` reads to mark the slow tests (``make test-fast`` skips them).

    .venv/bin/python -m pytest -q --junitxml=/tmp/suite.xml   # the whole suite, on a 2-core machine
    .venv/bin/python tests/record_durations.py /tmp/suite.xml

Durations are wall seconds of setup + call + teardown (pytest's default ``junit_duration_report``); a
test missing from the file (a new one) counts as fast until the file is recorded again.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).parent


def node_id(case: ET.Element) -> str:
    """``tests/dir/test_file.py::test_name[param]`` from a JUnit ``testcase`` (classname ``tests.dir.test_file``)."""
    module = case.get("classname", "").replace(".", "/")
    return f"{module}.py::{case.get('name')}"


def main(xml_path: str) -> None:
    cases = ET.parse(xml_path).getroot().iter("testcase")
    durations = {node_id(c): round(float(c.get("time", 0.0)), 2) for c in cases}
    missing = [n for n in durations if not (HERE.parent / n.split("::")[0]).exists()]
    if missing:
        raise SystemExit(f"{xml_path}: test files not found for {missing[:3]} (run pytest from the repository root)")
    out = HERE / "durations.json"
    out.write_text(json.dumps(dict(sorted(durations.items())), indent=0) + "\n")
    print(f"{out}: {len(durations)} tests, {sum(durations.values()):.0f} s in all")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
