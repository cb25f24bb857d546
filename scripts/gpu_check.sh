#!/usr/bin/env bash
# Every check of lmtrain that needs a GPU, in one command, each step's output kept under one
# folder. Runs from the root of a checkout with a built (or unpacked, `make bundle`) build folder.
#
#   scripts/gpu_check.sh [--build DIR] [--out DIR] [STEP ...] [--test-args ARG ...] [-- BENCH_ARGS ...]
#
# Steps, in the order given (default: tests memcheck):
#   tests     the CUDA backend against the CPU (lmtrain_gpu_tests with the arguments after
#             --test-args, e.g. a Catch2 test spec "[attention]"), then its NCCL watchdog case
#   memcheck  compute-sanitizer's memcheck over one training step of configs/tiny.json
#   table     times cuBLASLt's algorithms for the bench's shapes (d12 at the larger of batches
#             128 and 96 that fits, and at 64; d20 at 32, 24 and 16, where they fit) into this
#             GPU's table, configs/matmul/<gpu>.json, which later runs (and the bench) then take
#   bench     scripts/bench/run.py with BENCH_ARGS, results under OUT/bench
#
# Before the first step it says which GPU and which CUDA libraries the binaries will load, and
# stops if one is missing. Each step's log is OUT/<step>.log (default OUT: gpu-check/); a failed
# step does not stop the later ones; the exit status is non-zero if any failed.
set -uo pipefail

usage() { sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; }

build=build
out=gpu-check
test_args=()
steps=()
bench_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build=${2:?--build needs a folder}; shift 2 ;;
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    --test-args)
      shift
      while [ $# -gt 0 ] && [ "$1" != -- ]; do test_args+=("$1"); shift; done ;;
    -h | --help) usage; exit 0 ;;
    --) shift; bench_args=("$@"); break ;;
    tests | memcheck | table | bench) steps+=("$1"); shift ;;
    *) echo "gpu_check.sh: unknown step or option '$1' (steps: tests memcheck table bench)" >&2; exit 2 ;;
  esac
done
[ ${#steps[@]} -gt 0 ] || steps=(tests memcheck)
[ -f configs/tiny.json ] || { echo "gpu_check.sh: run it from the repository root" >&2; exit 2; }
mkdir -p "$out"

# Library path of lmtrain's programs (not of the PyTorch reference, which keeps its own): the
# bundle's libraries first (build/lib, from `make bundle`), then the CUDA toolkit's, then those of
# NVIDIA's Python wheels (a machine whose CUDA libraries came with PyTorch: NCCL, cuDNN and NVRTC
# are often only there). cuDNN and NVRTC are opened at run time, so `ldd` cannot vouch for them:
# they are looked up below.
library_dirs=()
[ -d "$build/lib" ] && library_dirs+=("$(cd "$build/lib" && pwd)")
for d in "${CUDA_HOME:-/usr/local/cuda}/lib64" "${CUDA_HOME:-/usr/local/cuda}/lib"; do
  [ -d "$d" ] && library_dirs+=("$d")
done
wheels=$(python3 -c 'import nvidia; print(*nvidia.__path__, sep="\n")' 2>/dev/null)
for w in $wheels; do
  for d in "$w"/*/lib; do [ -d "$d" ] && library_dirs+=("$d"); done
done
library_path=$(IFS=:; echo "${library_dirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
with_libraries=(env LD_LIBRARY_PATH="$library_path")

# Where the loader would find a library opened by name: the library path, then ld.so's cache.
find_library() {
  local dir
  for dir in ${library_path//:/ }; do
    [ -e "$dir/$1" ] && { echo "$dir/$1"; return 0; }
  done
  ldconfig -p 2>/dev/null | awk -v lib="$1" '$1 == lib { print $NF; exit }' | grep . || return 1
}

lmtrain="$build/lmtrain"
gpu_tests="$build/tests/lmtrain_gpu_tests"
{
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null ||
    echo "no GPU: nvidia-smi found none"
  if [ -f "$build/bundle-commit" ] && [ "$(head -1 "$build/bundle-commit")" != "$(git rev-parse HEAD 2>/dev/null)" ]; then
    echo "warning: $build was built from $(head -1 "$build/bundle-commit"), not from this checkout's commit"
  fi
  for bin in "$lmtrain" "$gpu_tests"; do
    [ -x "$bin" ] || { echo "missing: $bin (make build, or unpack a bundle)"; continue; }
    "${with_libraries[@]}" ldd "$bin" | grep "not found" | sed "s|^|$bin needs |"
  done
  for lib in libcudart.so.13 libcublasLt.so.13 libnccl.so.2 libcudnn.so.9 libnvrtc.so.13; do
    echo "$lib: $(find_library $lib || echo 'not found')"
  done
} 2>&1 | tee "$out/environment.log"
if grep -q "^no GPU\|^missing: \| needs .*not found\|^libcu[a-z]*.so.13: not found" \
  "$out/environment.log"; then
  echo "gpu_check.sh: cannot run the checks here (above; $out/environment.log)" >&2
  exit 1
fi

# The bench runs lmtrain through this, so that only lmtrain gets the library path.
out=$(realpath "$out")
mkdir -p "$out/bin"
printf '#!/bin/sh\nLD_LIBRARY_PATH="%s" exec "%s" "$@"\n' "$library_path" "$(realpath "$lmtrain")" \
  >"$out/bin/lmtrain"
chmod +x "$out/bin/lmtrain"

gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
table="configs/matmul/$(echo "$gpu_name" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/-$//').json"

step_tests() {
  "${with_libraries[@]}" "$gpu_tests" "${test_args[@]}" &&
    "${with_libraries[@]}" "$gpu_tests" "[nccl-watchdog]"
}

step_memcheck() {
  local sanitizer
  sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2>/dev/null) ||
    { echo "compute-sanitizer not found: memcheck skipped"; return 0; }
  echo "memcheck: one training step of configs/tiny.json on the cuda backend"
  "${with_libraries[@]}" "$sanitizer" --tool memcheck --error-exitcode 1 "$lmtrain" train --config configs/tiny.json \
    --overwrite --set run.backend=cuda --set schedule.num_iterations=1 --set eval.every=-1 \
    --set checkpoint.save_final=false --set run.out_dir="$out/memcheck-runs"
}

# A few steps per config and batch with the timing mode on; each newly timed shape is added to
# the table (docs/CUDA.md, "Measured algorithms and tables"). The shapes depend on the batch: the
# largest that fits lmtrain, and those the reference runs at when it fits only smaller ones.
step_table() {
  local group config batches dir status failed=0
  for group in d12:128,96 d12:64 d20:32 d20:24 d20:16; do
    config=${group%%:*} batches=${group#*:}
    dir="$out/table-runs/$config-${batches//,/-}"
    LMTRAIN_MATMUL_TUNING=measure LMTRAIN_MATMUL_TABLE="$table" \
      python3 scripts/bench/run.py --lmtrain "$out/bin/lmtrain" --configs "$config" --batches "$batches" \
      --steps 3 --warmup-steps 1 --skip-torch --no-profile --budget-s 200 --out "$dir"
    status=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["rows"][0]["lmtrain"]["status"])' \
      "$dir/results.json" 2>/dev/null)
    case "$status" in
      ok) ;;
      oom) echo "$config does not fit at batches $batches: skipped" ;;
      *) echo "$config at batches $batches: ${status:-no result}"; failed=1 ;;
    esac
  done
  [ -f "$table" ] && echo "table: $table, $(grep -c '"m":' "$table") shapes"
  return $failed
}

step_bench() {
  python3 scripts/bench/run.py --lmtrain "$out/bin/lmtrain" --out "$out/bench" "${bench_args[@]}"
}

summary=()
status=0
for step in "${steps[@]}"; do
  echo "=== $step"
  start=$SECONDS
  PYTHONUNBUFFERED=1 "step_$step" 2>&1 | tee "$out/$step.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || status=1
  summary+=("$(printf '%-9s %s  %4d s' "$step" "$([ "$rc" = 0 ] && echo ok || echo "FAILED ($rc)")" $((SECONDS - start)))")
done
echo "=== gpu_check.sh on $gpu_name (logs in $out/)"
printf '%s\n' "${summary[@]}"
exit $status
