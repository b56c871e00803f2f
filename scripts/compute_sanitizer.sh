#!/usr/bin/env bash
# Runs NVIDIA compute-sanitizer over scripts/sanitizer_driver.py (small flashmoe CUDA calls: bf16,
# fp16, fp32 and TF32, gated and plain, dropless and dropping, T=1 and T=130) once per tool, and
# exits non-zero if any tool reports an error or the driver finds a wrong result.
#
#   scripts/compute_sanitizer.sh                        # memcheck racecheck synccheck initcheck
#   FLASHMOE_SANITIZER_TOOLS="memcheck" scripts/compute_sanitizer.sh
#   FLASHMOE_SANITIZER_LOG_DIR=bench/results/x scripts/compute_sanitizer.sh   # one log per tool
#   FLASHMOE_SANITIZER_FILTER="kns=moe_persistent_kernel" ...  # check only the flashmoe kernel
#   FLASHMOE_SANITIZER_DRIVER_ARGS="--case 0,1" ...     # fewer cases
#   FLASHMOE_SANITIZER_OPTIONS="--show-backtrace device" ...  # more compute-sanitizer options
#
# What each tool covers:
#   memcheck   out-of-bounds and misaligned accesses to global, local and shared memory, and device
#              errors. PYTORCH_NO_CUDA_MEMORY_CACHING=1 is set so that every tensor is its own
#              cudaMalloc: with torch's caching allocator a write past a tensor's end usually lands
#              in the same cached segment and memcheck cannot see it.
#   racecheck  hazards on SHARED memory only, between the threads of one block. It does not see races
#              through global memory (between CTAs, or between the scheduler/subscriber warps and the
#              processors through the workspace's signal words); those are the business of the
#              protocol tests, the determinism tests and the bitwise replays in tests/test_moe_cuda.py.
#   synccheck  invalid uses of __syncthreads/__syncwarp/barriers (divergent barriers, bad masks).
#   initcheck  reads of global memory that nothing wrote: proves the kernel reads no uninitialized
#              workspace or output (the op allocates both with torch.empty).
# The instrumented kernel runs 10-100x slower; the driver's shapes are small for that reason.
set -uo pipefail
cd "$(dirname "$0")/.."

python_bin=${PYTHON:-python}
tools=${FLASHMOE_SANITIZER_TOOLS:-memcheck racecheck synccheck initcheck}
log_dir=${FLASHMOE_SANITIZER_LOG_DIR:-}
driver_args=${FLASHMOE_SANITIZER_DRIVER_ARGS:-}
# The instrumented kernel needs more registers, so the occupancy-sized cooperative grid may no
# longer fit: a small grid keeps every CTA resident (and the run short). Results do not depend on it.
export FLASHMOE_CUDA_MAX_CTAS=${FLASHMOE_CUDA_MAX_CTAS:-8}

sanitizer=${COMPUTE_SANITIZER:-}
if [[ -z $sanitizer ]]; then
  for candidate in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
                   /usr/local/cuda/bin/compute-sanitizer "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")/compute-sanitizer"; do
    if [[ -n $candidate && -x $candidate ]]; then sanitizer=$candidate; break; fi
  done
fi
if [[ -z $sanitizer ]]; then
  echo "compute_sanitizer.sh: compute-sanitizer not found (set COMPUTE_SANITIZER or CUDA_HOME)" >&2
  exit 2
fi
echo "# $("$sanitizer" --version 2>&1 | tail -n 1)"

"$python_bin" scripts/sanitizer_driver.py --list || exit 2
[[ -n $log_dir ]] && mkdir -p "$log_dir"

export PYTORCH_NO_CUDA_MEMORY_CACHING=1
failed=()
for tool in $tools; do
  options=(--tool "$tool" --error-exitcode 1 --print-limit 100)
  [[ $tool == racecheck ]] && options+=(--racecheck-report all)
  [[ -n ${FLASHMOE_SANITIZER_FILTER:-} ]] && options+=(--filter "$FLASHMOE_SANITIZER_FILTER")
  # shellcheck disable=SC2206  # extra options, split like a command line
  [[ -n ${FLASHMOE_SANITIZER_OPTIONS:-} ]] && options+=($FLASHMOE_SANITIZER_OPTIONS)
  echo "# ---- compute-sanitizer ${options[*]} $python_bin scripts/sanitizer_driver.py $driver_args"
  started=$SECONDS
  if [[ -n $log_dir ]]; then
    # shellcheck disable=SC2086
    "$sanitizer" "${options[@]}" "$python_bin" scripts/sanitizer_driver.py $driver_args 2>&1 | tee "$log_dir/sanitizer-$tool.log"
    status=${PIPESTATUS[0]}
  else
    # shellcheck disable=SC2086
    "$sanitizer" "${options[@]}" "$python_bin" scripts/sanitizer_driver.py $driver_args 2>&1
    status=$?
  fi
  echo "# ---- $tool: exit $status after $((SECONDS - started)) s"
  [[ $status -ne 0 ]] && failed+=("$tool")
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "compute_sanitizer.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "compute_sanitizer.sh: every tool clean ($tools)"
