#!/usr/bin/env bash
# Every CUDA measurement in one call on the device machine (see benchmarks/RESULTS.md):
#   run(command="bash benchmarks/cuda_run.sh", carry=[".whl"], timeout_s=600)
# RUN_TESTS=1 adds the precision check and the GPU tests, TRITON_BENCH=1 the Triton kernels' own
# benchmarks (the merge, the fused linear forward); arguments go to run.py (e.g. --only merge).
# Installs only the carried wheels (.whl/: array-api-compat, ml_dtypes, peft) whose package is
# missing there, then runs `benchmarks/run.py --device cuda` with its table, JSON and log in $OUT.
# Locally, to test the script's logic: DEVICE=cpu OUT=/tmp/o bash benchmarks/cuda_run.sh --tiny
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

wheels=()
for pkg in array_api_compat ml_dtypes peft; do
  if ! "$PY" -c "import $pkg" 2>/dev/null; then
    found=(.whl/"$pkg"-*.whl)
    [ -e "${found[0]}" ] || { echo "missing $pkg and no wheel for it in .whl/"; exit 2; }
    wheels+=("${found[@]}")
  fi
done
if [ ${#wheels[@]} -gt 0 ]; then
  echo "# installing carried wheels: ${wheels[*]}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${wheels[@]}" || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  date -u +"# %Y-%m-%dT%H:%M:%SZ"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv
  "$PY" -c "import torch, peft, sys; print('# python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/env.txt"

"$PY" benchmarks/run.py --device "$DEVICE" --out "$OUT" --budget-s "${BUDGET_S:-420}" "$@" 2>&1 | tee "$OUT/log.txt"
status=${PIPESTATUS[0]}

if [ "${RUN_TESTS:-0}" = 1 ]; then
  # which merge path rounds once, on this GPU (see precision_check.py)
  "$PY" benchmarks/precision_check.py 2>&1 | tee "$OUT/precision.txt"
  # the hot-path tests on the GPU too (the CUDA cases skip elsewhere); JAX kept off the GPU
  JAX_PLATFORMS=cpu "$PY" -m pytest -q -p no:cacheprovider tests/test_capabilities.py \
    tests/test_torch_backend.py tests/test_triton_merge.py tests/test_triton_linear.py 2>&1 | tail -25 | tee "$OUT/tests.txt"
  status=$((status | PIPESTATUS[0]))
fi
if [ "${TRITON_BENCH:-0}" = 1 ]; then
  # the fused merge kernel alone against a copy and the unfused path (per call and in CUDA graphs)
  "$PY" benchmarks/bench_triton_merge.py --out "$OUT" 2>&1 | tee "$OUT/triton_merge.txt"
  status=$((status | PIPESTATUS[0]))
  # the fused LoRA linear forward against the plain linear, our unfused path and PEFT (~1 min)
  "$PY" benchmarks/bench_triton_linear.py --out "$OUT" 2>&1 | tee "$OUT/triton_linear.txt"
  status=$((status | PIPESTATUS[0]))
fi
exit "$status"
