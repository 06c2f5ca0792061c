#!/usr/bin/env bash
# The one command for a lent GPU machine (issue 18's figures), run by the workplace's device tool as
#   run(command="bash benchmarks/device/run.sh", carry=[".whl"], timeout_s=560)
# after `bash benchmarks/device/wheels.sh` here. It installs the carried wheels into /tmp/site (no package
# index there), checks that the GPU and every import the benchmarks need are present, then runs
# `benchmarks.gpu_all` with a budget that leaves the loader its time, writing gpu_all.json and the log to $OUT.
# GPU_ALL_ARGS (default "--budget-s 420": start no new job after 7 minutes) are gpu_all's arguments;
# REQUIRE_CUDA=0 lets the check pass without a GPU (to try the script on a CPU, with GPU_ALL_ARGS=--tiny);
# WHEELS (default .whl) is the folder of wheels to install first, if it holds any.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
WHEELS=${WHEELS:-.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "installing the carried wheels from $WHEELS failed"; exit 3; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$OUT/device_check.txt"
import importlib, os, sys
import torch
missing = []
for name in ("monai", "nibabel", "omegaconf", "pydicom", "scipy", "skimage", "matplotlib", "safetensors", "yaml",
             "typer", "tqdm", "medhpm.pretrain.trainer", "medhpm.segment.trainer", "medhpm.data", "benchmarks.gpu_all"):
    try:
        importlib.import_module(name)
    except Exception as e:
        missing.append(f"{name}: {type(e).__name__}: {e}")
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
if os.environ.get("REQUIRE_CUDA", "1") != "0" and not torch.cuda.is_available():
    missing.append("no CUDA device")
if missing:
    print("NOT READY:", *missing, sep="\n  ")
    sys.exit(4)
print("ready")
PY
status=${PIPESTATUS[0]}
[ "$status" -eq 0 ] || exit "$status"
python3 -m benchmarks.gpu_all ${GPU_ALL_ARGS:---budget-s 420} --out "$OUT" 2>&1 | tee "$OUT/gpu_all.log"
exit "${PIPESTATUS[0]}"
