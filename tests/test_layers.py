"""The package's layers point one way: a module imports only from its own layer or a lower one.

Every module under ``src/medhpm`` is parsed with ``ast`` (nothing is imported); each ``medhpm.*`` import,
at the top of a file or inside a function, must point to the same or a lower layer of ``LAYERS``.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "medhpm"

# bottom -> top; the first matching prefix names a module's layer
LAYERS: dict[str, int] = {
    "medhpm.config": 1,
    "medhpm.models": 2,  # pure networks: ViT, UNETR, DynUNet, state-dict key mapping
    "medhpm.runtime": 3,  # device, distributed, atomic files, checkpoints, schedules, the training loop
    "medhpm.data": 4,
    "medhpm.evaluate": 5,
    "medhpm.pretrain": 6,
    "medhpm.segment": 7,
    "medhpm.viz": 8,
    "medhpm.pipeline": 9,
    "medhpm.experiment": 9,
    "medhpm.cli": 10,  # may import anything
}
EXEMPT = {"medhpm", "medhpm.__init__", "medhpm.__main__"}  # the package root (its __version__) is below all

# Upward imports that remain, each with its reason; remove an entry when its import is gone (the test
# fails on an entry that no longer occurs, so the list stays true). None remain.
ALLOWED: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def medhpm_imports(path: Path, module: str | None = None) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every medhpm import in the file, in functions too, by line.
    ``module``: the file's dotted name (default: from its place under ``src``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = (module or module_name(path)).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "medhpm"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "medhpm":
                continue
            if module == "medhpm":  # from medhpm import config, __version__
                found += [
                    (f"medhpm.{a.name}" if layer_of(f"medhpm.{a.name}") else "medhpm", node.lineno) for a in node.names
                ]
            else:
                found.append((module, node.lineno))
    return sorted(found, key=lambda item: item[1])


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    unplaced = [module_name(p) for p in modules() if module_name(p) not in EXEMPT and layer_of(module_name(p)) is None]
    assert not unplaced, f"modules outside the layer table (add them to LAYERS): {unplaced}"


def test_imports_point_to_the_same_or_a_lower_layer():
    upward, seen_allowed = [], set()
    for path in modules():
        mod = module_name(path)
        if mod in EXEMPT or mod == "medhpm.cli":
            continue
        for target, line in medhpm_imports(path):
            if target in EXEMPT:
                continue
            own, theirs = layer_of(mod), layer_of(target)
            assert theirs is not None, f"{mod} (line {line}) imports {target}, which is not in the layer table"
            if theirs > own:
                if (mod, target) in ALLOWED:
                    seen_allowed.add((mod, target))
                    continue
                upward.append(f"{path.relative_to(SRC)}:{line}: {mod} (layer {own}) imports {target} (layer {theirs})")
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)
    stale = ALLOWED - seen_allowed
    assert not stale, f"ALLOWED lists upward imports that no longer occur (remove them): {sorted(stale)}"


def test_the_checker_sees_in_function_relative_and_package_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os\n\ndef f():\n    from medhpm.segment.predict import Predictor\n\n"
        "from ..data import io\nfrom medhpm import __version__, viz\nimport medhpm.cli\n"
    )
    found = medhpm_imports(probe, module="medhpm.models.probe")
    assert found == [
        ("medhpm.segment.predict", 4),
        ("medhpm.data", 6),
        ("medhpm", 7),
        ("medhpm.viz", 7),
        ("medhpm.cli", 8),
    ]
    assert [layer_of(m) for m, _ in found] == [7, 4, None, 8, 10]
