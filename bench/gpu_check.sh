#!/usr/bin/env bash
# Every GPU check in one go, for a lent GPU machine (never needed by CI).
#
#   bash bench/gpu_check.sh            # figures and logs under $OUT (default build/gpu)
#
# Builds a venv with tlserve[serve-gpu] (onnxruntime-gpu, nvidia-ml-py) and the
# test tools (onnxruntime and onnxruntime-gpu cannot share one venv, so this is
# not the dev venv), then: nvidia-smi, the gpu-marked tests, a CUDA serving
# smoke test with I/O binding, NVML metrics scraped from a live server, and a
# quick throughput figure, CPU against CUDA, on the same model.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/gpu}"
mkdir -p "$OUT"
VENV="${GPU_VENV:-build/gpu-venv}"
exec > >(tee "$OUT/gpu_check.log") 2>&1

echo "== machine"; nvidia-smi || echo "nvidia-smi failed: no usable GPU?"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  # From the machine's index or local wheels; the lent machine may have no network.
  if ! "$VENV/bin/pip" install -q -e '.[serve-gpu]' pytest pytest-timeout pytest-asyncio \
      hypothesis onnx; then
    echo "pip install failed (offline?): using python3 if its onnxruntime has CUDA"
    rm -rf "$VENV"
  fi
fi
PY="$VENV/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"
"$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" \
  | tee "$OUT/providers.txt"

echo "== gpu-marked tests (tests/server/test_providers.py, test_tuning.py: TensorRT engine cache)"
status=0
"$PY" -m pytest tests/server/test_providers.py tests/server/test_tuning.py -m gpu -v \
  -p no:cacheprovider -rs \
  --junitxml="$OUT/gpu_tests.xml" || status=$?

echo "== CUDA serving smoke test, NVML metrics, throughput CPU vs CUDA"
(cd bench && "$PY" gpu_smoke.py --out "../$OUT") || status=$?
echo "gpu_check: exit $status; figures in $OUT"
exit $status
