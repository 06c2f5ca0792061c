#!/usr/bin/env bash
# Fetch the wheels that `benchmarks/device/run.sh` installs on a GPU machine that reaches no package index (an
# offline cluster node, or the GPU machine lent to this project's sessions). Its image is assumed to hold
# PyTorch with CUDA, numpy, scipy, scikit-image, matplotlib, tensorboard, safetensors, onnx, typer, tqdm and
# PyYAML, but not MONAI, nibabel, OmegaConf or pydicom. Those four are pure Python (py3-none-any wheels;
# DEVICE_PYTHON, default 3.12, is the version checked against their Requires-Python), and the versions fetched
# are the ones installed where this runs (the environment the tests ran in).
# Usage, from the repository root, after `make install`:
#   bash benchmarks/device/wheels.sh      (writes .whl/, about 7 MB, ignored by git)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
specs=$("$PY" - <<'PY'
import importlib.metadata as md, sys
out = []
for name in ("monai", "nibabel", "omegaconf", "pydicom"):
    try:
        out.append(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        sys.exit(f"{name} is not installed in {sys.executable}: run `make install` first (or set PYTHON)")
print(" ".join(out))
PY
)
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "${DEVICE_PYTHON:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $specs
ls -1 .whl
du -sh .whl
