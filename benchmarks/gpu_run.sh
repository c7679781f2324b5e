#!/usr/bin/env bash
# The whole GPU comparison in one call on the device machine (see benchmarks/RESULTS.md):
#   install the carried wheels (.whl/*.whl: diffusers and importlib_metadata), run throughput.py on CUDA,
#   then the CUDA-only tests (pytest -m gpu, log in $OUT/gpu_tests.log), and print the Markdown section that
#   benchmarks/record.py would write from the result.
# Environment: OUT (where the JSON and the log go; default /tmp/ddpm-bench), BUDGET (seconds, default 400),
#   MODES and WHAT (throughput.py's --modes and --what: e.g. WHAT=infer for a run of the inference experiments),
#   TESTS (the test files for pytest -m gpu, or none), TEST_TIMEOUT (seconds, default 130) and TEST_WORKERS
#   (pytest-xdist processes where xdist imports, e.g. carried as .whl/pytest_xdist-*.whl and execnet-*.whl:
#   the kernel tests spend most of their time compiling Triton kernels, one at a time per process; default 4,
#   0: one process);
# for a check of this script on a CPU (tests/test_benchmark.py): DEVICE=cpu SIZE=tiny MODES=ours:fp32,...
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ddpm-bench}
BUDGET=${BUDGET:-400}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-}
MODES=${MODES:-}
WHAT=${WHAT:-}
TESTS=${TESTS:-tests/test_accel.py tests/test_trainer.py tests/test_cli.py tests/test_kernels.py}
TEST_TIMEOUT=${TEST_TIMEOUT:-130}
TEST_WORKERS=${TEST_WORKERS:-4}
extra=(); record_extra=()
[ -n "$SIZE" ] && extra+=(--size "$SIZE")
[ -n "$MODES" ] && extra+=(--modes "$MODES")
[ -n "$WHAT" ] && extra+=(--what "$WHAT")
[ "$DEVICE" = cpu ] && record_extra+=(--allow-cpu)
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_run.sh: installing .whl/*.whl failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "gpu_run.sh: no .whl/*.whl carried; diffusers must already be installed" >&2
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import diffusers; print('diffusers', diffusers.__version__)"; then
  # on the GPU a run without diffusers has no baseline: stop before spending the device time
  if [ "$DEVICE" = cuda ] && { [ -z "$MODES" ] || [[ "$MODES" == *diffusers:* ]]; }; then
    echo "gpu_run.sh: diffusers does not import, so the run would have no baseline; carry .whl/ with its wheel" \
      "(benchmarks/RESULTS.md, 'How to measure and record')" >&2
    exit 2
  fi
  echo "gpu_run.sh: WARNING: diffusers does not import; the run will have no baseline" >&2
fi
[ "$DEVICE" = cuda ] && { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; }
set -o pipefail
PYTHONUNBUFFERED=1 python3 benchmarks/throughput.py --device "$DEVICE" --budget-s "$BUDGET" --out "$OUT" \
  "${extra[@]}" 2>&1 \
  | tee "$OUT/throughput.log"
rc=$?
if [ "$DEVICE" = cuda ]; then
  # the CUDA-only correctness tests (graphed training step = eager step; the trainer in bf16 + channels_last)
  if [ "$TESTS" = none ]; then
    echo; echo "=== pytest -m gpu: not run (TESTS=none) ==="
  else
    workers=()
    if [ "$TEST_WORKERS" != 0 ] && python3 -c "import xdist, execnet" 2>/dev/null; then
      workers=(-n "$TEST_WORKERS")
    fi
    echo; echo "=== pytest -m gpu ($TESTS) ${workers[*]} ==="
    # shellcheck disable=SC2086
    timeout "$TEST_TIMEOUT" python3 -m pytest -m gpu $TESTS -q -p no:cacheprovider "${workers[@]}" 2>&1 \
      | tee "$OUT/gpu_tests.log" | tail -15
  fi
fi
json=$(ls -t "$OUT"/*.json 2>/dev/null | head -1)
if [ -n "$json" ]; then
  echo
  echo "=== the section benchmarks/record.py writes from $(basename "$json") ==="
  python3 benchmarks/record.py "$json" --print "${record_extra[@]}"
fi
exit $rc
