#!/usr/bin/env bash
# The GPU suite, one command on a machine with an NVIDIA GPU (bench/README.md, "The GPU suite"):
#   1. build      pip install --no-build-isolation -e . (verbose: the ptxas resource report is in
#                 the log), then check that flashmoe._C has its CUDA backend
#   2. test       pytest -m gpu (tests/test_moe_cuda.py and every other gpu-marked test)
#   3. sanitizer  scripts/compute_sanitizer.sh (memcheck, racecheck, synccheck, initcheck)
#   3b. loopback  expert parallelism on this one GPU (docs/cuda_kernel.md "Loopback"): pytest -m gpu
#                 tests/test_loopback.py, compute-sanitizer memcheck on one loopback test with a small
#                 grid, and flashmoe-bench --loopback 4 against the single-GPU op
#   4. bench      flashmoe-bench over the named configurations in bf16: fused (native) vs reference
#                 vs expert-loop vs grouped-mm, with the dense-GEMM and copy floors; then the targets
#   5. model      the performance model's PREDICTIONS (python -m flashmoe.bench.model) beside what the
#                 bench step measured, plus a T=1 tiny-shape run for the fixed cost per call
# Every step runs even when an earlier one failed; the exit status is 1 when any step failed.
# Raw logs and JSON go to bench/results/<UTC timestamp>-<device>-*.
#
# Settings (environment variables):
#   FLASHMOE_SUITE_STEPS        steps to run, comma-separated (default build,test,sanitizer,loopback,bench,model)
#   FLASHMOE_SUITE_CONFIGS      bench configs (default mixtral,qwen3-30b-a3b,olmoe,deepseek-v3,paper)
#   FLASHMOE_SUITE_TOKENS       bench token counts (default 1,16,128,1024,4096,16384; paper adds 8192)
#   FLASHMOE_SUITE_BACKENDS     bench backends (default native,reference,expert-loop,grouped-mm)
#   FLASHMOE_SUITE_ROUTING      uniform, skewed or uniform,skewed (default uniform)
#   FLASHMOE_SUITE_BUDGET       seconds per bench row (default 2)
#   FLASHMOE_SUITE_LOOPBACK_TOKENS  tokens per rank of the loopback bench (default 1,128,1024,4096)
#   FLASHMOE_SUITE_BASELINE_MAX_TOKENS  skip reference and expert-loop above this T (default: run them all)
#   FLASHMOE_SUITE_BENCH_ARGS   extra flashmoe-bench arguments (e.g. "--iters 20"; "--experts 16
#                               --hidden 64 --ffn 32 --device cpu" makes a quick smoke run anywhere)
#   FLASHMOE_SUITE_PYTEST_ARGS  extra pytest arguments, e.g. "-m 'gpu and not slow'" or "-x"
#   FLASHMOE_SUITE_STEP_TIMEOUT seconds each step may run (default: no limit)
#   FLASHMOE_INSTALL_CMD        replaces the build step's pip command
#   FLASHMOE_RESULTS_DIR        where the files go (default bench/results)
#   FLASHMOE_SUITE_ARCHIVE      also pack this run's files into this .tar.gz
#   PYTHON                      the interpreter (default python3)
set -uo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$self")/.."

python_bin=${PYTHON:-python3}
steps=",${FLASHMOE_SUITE_STEPS:-build,test,sanitizer,loopback,bench,model},"
configs=${FLASHMOE_SUITE_CONFIGS:-mixtral,qwen3-30b-a3b,olmoe,deepseek-v3,paper}
tokens=${FLASHMOE_SUITE_TOKENS:-1,16,128,1024,4096,16384}
bench_backends=${FLASHMOE_SUITE_BACKENDS:-native,reference,expert-loop,grouped-mm}
routing=${FLASHMOE_SUITE_ROUTING:-uniform}
budget=${FLASHMOE_SUITE_BUDGET:-2}
loopback_tokens=${FLASHMOE_SUITE_LOOPBACK_TOKENS:-1,128,1024,4096}
baseline_max_tokens=${FLASHMOE_SUITE_BASELINE_MAX_TOKENS:-}
pytest_args=${FLASHMOE_SUITE_PYTEST_ARGS:-}
bench_args=${FLASHMOE_SUITE_BENCH_ARGS:-}
step_timeout=${FLASHMOE_SUITE_STEP_TIMEOUT:-}
results=${FLASHMOE_RESULTS_DIR:-bench/results}
export PYTHONUNBUFFERED=1

# ------------------------------------------------------------------ the steps

build() {
  if ! "$python_bin" -c "import cutlass_library" 2>/dev/null; then
    echo "gpu_suite.sh: note: nvidia-cutlass is not installed; --no-build-isolation builds take the CuTe" \
         "headers from it (pip install 'nvidia-cutlass~=4.2.0', or carry its wheel to an offline machine)"
  fi
  if [[ -n ${FLASHMOE_INSTALL_CMD:-} ]]; then
    bash -c "$FLASHMOE_INSTALL_CMD" || return 1
  else
    "$python_bin" -m pip install --no-build-isolation -v -e . || return 1
  fi
  "$python_bin" -c '
import sys
import torch
import flashmoe
from flashmoe import _C
print("torch", torch.__version__, "CUDA", torch.version.cuda, "device",
      torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print("flashmoe.build_info()", flashmoe.build_info())
if not getattr(_C, "cuda_compiled", False):
    sys.exit("flashmoe._C was built without its CUDA backend (cuda_compiled is False)")
print("flashmoe._C.cuda_build_info()", _C.cuda_build_info())
'
}

gpu_tests() {
  # The extra arguments are split as a command line would split them.
  eval "\"\$python_bin\" -m pytest -m gpu -q -rs --junitxml=\"\$prefix-pytest.xml\" $pytest_args tests"
}

# W virtual ranks of the expert-parallel kernel in one launch on this GPU: the gpu tests, memcheck on
# one of them (W = 4 on 8 CTAs: the instrumented kernel fits fewer per SM), and the W = 4 benchmark.
loopback() {
  local status=0 sanitizer
  eval "\"\$python_bin\" -m pytest -m gpu -q -rs --junitxml=\"\$prefix-loopback-pytest.xml\" $pytest_args \
        tests/test_loopback.py" || status=1
  sanitizer=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}
  echo "# ---- compute-sanitizer memcheck: tests/test_loopback.py::test_shared_expert[bf16], 8 CTAs"
  FLASHMOE_CUDA_MAX_CTAS=8 PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 1 \
    --print-limit 100 "$python_bin" -m pytest -m gpu -q "tests/test_loopback.py::test_shared_expert[bf16]" \
    2>&1 | tee "$prefix-loopback-memcheck.txt"
  [[ ${PIPESTATUS[0]} -ne 0 ]] && status=1
  echo "# ---- flashmoe-bench --config paper --loopback 4 --tokens $loopback_tokens"
  "$python_bin" -m flashmoe.bench --config paper --dtype bf16 --tokens "$loopback_tokens" --loopback 4 \
    --json "$prefix-loopback-bench.json" | tee "$prefix-loopback-bench.txt"
  [[ ${PIPESTATUS[0]} -ne 0 ]] && status=1
  return $status
}

bench() {
  local status=0 config config_tokens files extra=()
  [[ -n $baseline_max_tokens ]] && extra+=(--baseline-max-tokens "$baseline_max_tokens")
  # shellcheck disable=SC2206  # split like a command line
  [[ -n $bench_args ]] && extra+=($bench_args)
  for config in ${configs//,/ }; do
    config_tokens=$tokens
    # The FlashMoE paper's layer is reported at T=8192 too (its 8xH100 result: 3.7 ms).
    [[ $config == paper ]] && config_tokens="$tokens,8192"
    config_tokens=$(echo "$config_tokens" | tr ',' '\n' | sort -n | uniq | paste -sd, -)
    echo "# ---- flashmoe-bench --config $config --tokens $config_tokens"
    "$python_bin" -m flashmoe.bench --config "$config" --dtype bf16 --tokens "$config_tokens" \
      --backend "$bench_backends" --routing "$routing" --floors --budget "$budget" ${extra[@]+"${extra[@]}"} \
      --json "$prefix-bench-$config.json" | tee "$prefix-bench-$config.txt"
    [[ ${PIPESTATUS[0]} -ne 0 ]] && status=1
  done
  shopt -s nullglob
  files=("$prefix"-bench-*.json)
  if [[ ${#files[@]} -gt 0 ]]; then
    echo "# ---- targets (bench/README.md)"
    "$python_bin" -m flashmoe.bench.targets "${files[@]}" | tee "$prefix-targets.txt"
  fi
  return $status
}

# Predicted (docs/cuda_kernel.md, "Performance model") beside measured: the model's TSV for this run,
# the fixed cost per call measured on its tiny shape (flashmoe.bench.model.FIXED_COST_SHAPE), then
# each checked prediction next to this run's flashmoe-bench rows.
model() {
  local status=0 files
  "$python_bin" -m flashmoe.bench.model --write "$prefix-model-predictions.tsv" || status=1
  if nvidia-smi -L >/dev/null 2>&1; then
    echo "# ---- flashmoe-bench: the fixed cost per call (T=1, H=64, I=64, E=8, k=2)"
    "$python_bin" -m flashmoe.bench --hidden 64 --ffn 64 --experts 8 --top-k 2 --tokens 1 --dtype bf16 \
      --backend native --device cuda --budget "$budget" --json "$prefix-model-fixed.json" | tee "$prefix-model-fixed.txt"
    [[ ${PIPESTATUS[0]} -ne 0 ]] && status=1
  fi
  shopt -s nullglob
  files=("$prefix"-bench-*.json)
  [[ -f $prefix-model-fixed.json ]] && files+=("$prefix-model-fixed.json")
  if [[ ${#files[@]} -gt 0 ]]; then
    "$python_bin" -m flashmoe.bench.model --compare "${files[@]}" | tee "$prefix-model-vs-measured.txt"
    [[ ${PIPESTATUS[0]} -ne 0 ]] && status=1
  else
    { echo "# no flashmoe-bench JSON in this run: the predictions alone"; cat "$prefix-model-predictions.tsv"; } |
      tee "$prefix-model-vs-measured.txt"
  fi
  return $status
}

# A step runs as this script again ("--step NAME") so that `timeout` has a process to limit.
if [[ ${1:-} == --step ]]; then
  prefix=$FLASHMOE_SUITE_PREFIX
  case ${2:-} in
    build) build ;;
    test) gpu_tests ;;
    sanitizer) PYTHON=$python_bin scripts/compute_sanitizer.sh ;;
    loopback) loopback ;;
    bench) bench ;;
    model) model ;;
    *) echo "gpu_suite.sh: unknown step ${2:-}" >&2; exit 2 ;;
  esac
  exit $?
fi

# ------------------------------------------------------------------ the run

mkdir -p "$results"
device=$("$python_bin" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')" \
         2>/dev/null || true)
[[ -z $device ]] && device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
[[ -z $device ]] && device=no-gpu
device_tag=$(echo "$device" | tr -cs 'A-Za-z0-9' '-' | sed 's/^-*//; s/-*$//' | tr '[:upper:]' '[:lower:]')
stamp=$(date -u +%Y%m%dT%H%M%SZ)
prefix="$results/$stamp-$device_tag"
export FLASHMOE_SUITE_PREFIX=$prefix
summary="$prefix-summary.txt"

{
  echo "# flashmoe GPU suite  $stamp"
  echo "# device: $device"
  echo "# commit: $(git rev-parse HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "# steps: $(echo "$steps" | tr ',' ' ')"
} | tee "$summary"
nvidia-smi > "$prefix-nvidia-smi.txt" 2>&1 || true

failed=()
# run_step NAME: runs step NAME, its output in $prefix-NAME.log and on the terminal.
run_step() {
  local name=$1 log="$prefix-$1.log" started=$SECONDS status
  echo "# ==== $name" | tee -a "$summary"
  if [[ -n $step_timeout ]]; then
    timeout --kill-after=30 "$step_timeout" "$self" --step "$name" 2>&1 | tee "$log"
  else
    "$self" --step "$name" 2>&1 | tee "$log"
  fi
  status=${PIPESTATUS[0]}
  echo "# ==== $name: exit $status after $((SECONDS - started)) s  (log: $log)" | tee -a "$summary"
  [[ $status -ne 0 ]] && failed+=("$name")
  return 0
}

for step in build test sanitizer loopback bench model; do
  [[ $steps == *,$step,* ]] && run_step "$step"
done

[[ -f $prefix-targets.txt ]] && cat "$prefix-targets.txt" >> "$summary"
[[ -f $prefix-model-vs-measured.txt ]] && cat "$prefix-model-vs-measured.txt" >> "$summary"
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "# FAILED steps: ${failed[*]}" | tee -a "$summary"
else
  echo "# every step passed" | tee -a "$summary"
fi
if [[ -n ${FLASHMOE_SUITE_ARCHIVE:-} ]]; then
  archive=$(realpath -m "$FLASHMOE_SUITE_ARCHIVE")
  (cd "$results" && tar -czf "$archive" "$(basename "$prefix")"-*) && echo "# packed $archive"
fi
[[ ${#failed[@]} -eq 0 ]]
