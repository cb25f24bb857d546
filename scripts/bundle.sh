#!/usr/bin/env bash
# A built lmtrain for a GPU machine that cannot install packages (no registry, no root): one
# tarball of the build folder's programs, the shared libraries they load that such a machine may
# lack, and the default corpus. Unpacked in the root of a checkout of the same commit, it gives
# the build folder and data/tiny/ that `make bench` and scripts/gpu_check.sh use.
#
#   scripts/bundle.sh BUILD_DIR OUT.tar.xz
#
# Left out, so that the target's own are used: the C and C++ runtimes (a program built against
# an older libstdc++ runs on a newer one, not the reverse, and cuDNN, opened at run time, may
# need the newer), and CUDA's libraries (the driver's libcuda, the runtime, cuBLAS, NCCL, cuDNN,
# NVRTC), which must match the target's driver and are there wherever CUDA programs run.
# scripts/gpu_check.sh puts BUILD_DIR/lib on the library path.
set -euo pipefail

build=${1:?usage: scripts/bundle.sh BUILD_DIR OUT.tar.xz}
out=${2:?usage: scripts/bundle.sh BUILD_DIR OUT.tar.xz}
[ -f configs/tiny.json ] || { echo "bundle.sh: run it from the repository root" >&2; exit 2; }
build=$(realpath --relative-to=. "$build")
case "$build" in ..*) echo "bundle.sh: $build: the build folder must be inside the repository" >&2; exit 2 ;; esac
[ -x "$build/lmtrain" ] || { echo "bundle.sh: $build/lmtrain is missing: make build first" >&2; exit 1; }
[ -f data/tiny/meta.json ] || { echo "bundle.sh: data/tiny is missing: make data first" >&2; exit 1; }
programs=("$build/lmtrain")
[ -x "$build/tests/lmtrain_gpu_tests" ] && programs+=("$build/tests/lmtrain_gpu_tests")

# The libraries and the commit go into a staging folder, not into the build folder.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/$build/lib"
left_out='^(linux-vdso|ld-linux-x86-64|libc|libm|libdl|libpthread|librt|libresolv|libstdc\+\+|libgcc_s|libcuda|libcudart|libcublas|libcublasLt|libnccl|libcudnn|libnvrtc)\.so'
libraries=$(ldd "${programs[@]}")
if grep "not found" <<<"$libraries"; then
  echo "bundle.sh: the programs need libraries this machine lacks (above)" >&2
  exit 1
fi
awk '$2 == "=>" && $3 ~ /^\// { print $1, $3 }' <<<"$libraries" | sort -u |
  while read -r name path; do
    grep -qE "$left_out" <<<"$name" || cp -L "$path" "$stage/$build/lib/$name"
  done

# Which commit the programs were built from: a checkout of another one has other goldens,
# configs and tests, and scripts/gpu_check.sh says so.
{
  git rev-parse HEAD
  git status --porcelain --untracked-files=no | grep -q . && echo "with uncommitted changes" || true
} >"$stage/$build/bundle-commit"

mkdir -p "$(dirname "$out")"
tar -c -I "xz -T0" -f "$out" --owner=0 --group=0 "${programs[@]}" data/tiny \
  -C "$stage" "$build/lib" "$build/bundle-commit"
echo "bundle.sh: $out ($(du -h "$out" | cut -f1)): ${programs[*]}," \
  "$(ls "$stage/$build/lib" | wc -l) libraries in $build/lib, data/tiny"
