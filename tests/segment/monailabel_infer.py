"""Run an exported bundle through MONAI Label's own ``BundleInferTask``, in a Python that has monailabel and
cannot import medhpm (run with ``python -I``; the finder below refuses every medhpm import).

    python -I monailabel_infer.py BUNDLE_DIR IMAGE OUT.nii.gz

monailabel imports ``torchvision.utils`` (for 2D image grids, unused by 3D bundle inference); where PyPI's
torchvision does not load beside a CPU build of torch, a stand-in package raising NotImplementedError is put
on the path. Prints the labels MONAI Label read from the bundle's metadata as JSON on the last line.
"""

import importlib.abc
import json
import shutil
import sys
import tempfile
from pathlib import Path


class _NoMedhpm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "medhpm" or name.startswith("medhpm."):
            raise ImportError("medhpm is hidden from this MONAI Label run")


def _torchvision_stand_in() -> None:
    try:
        import torchvision.utils  # noqa: F401

        return
    except Exception:  # not installed, or built for another torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    root = Path(tempfile.mkdtemp(prefix="tv_stand_in_")) / "torchvision"
    root.mkdir()
    (root / "__init__.py").write_text('"""stand-in: see monailabel_infer.py"""\n')
    (root / "utils.py").write_text(
        "def make_grid(*a, **k):\n    raise NotImplementedError('torchvision stand-in')\n\n\n"
        "def save_image(*a, **k):\n    raise NotImplementedError('torchvision stand-in')\n"
    )
    sys.path.insert(0, str(root.parent))


def main() -> None:
    bundle, image, out = sys.argv[1:4]
    sys.meta_path.insert(0, _NoMedhpm())
    try:
        import medhpm  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("medhpm is importable: the check would not show that the bundle runs without it")
    _torchvision_stand_in()
    from monailabel.tasks.infer.bundle import BundleInferTask

    task = BundleInferTask(bundle, conf={})
    if not task.is_valid():
        raise SystemExit(f"MONAI Label does not take {bundle} as a bundle")
    result, _ = task({"image": image, "device": "cpu", "result_extension": ".nii.gz"})
    shutil.copy(result, out)
    print(json.dumps(task.labels))


if __name__ == "__main__":
    main()
