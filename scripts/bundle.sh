#!/usr/bin/env bash
# A built lmtrain for a GPU machine that cannot install packages (no registry, no root): one
# tarball of the build folder's programs, the shared libraries they load that such a machine may
# lack, and the default corpus. Unpacked in the root of a checkout of the same commit, it gives
# the build/ folder and data/tiny/ that `make bench` and scripts/gpu_check.sh use.
#
#   scripts/bundle.sh BUILD_DIR OUT.tar.xz
#
# Left out, so that the target's own are used: the C and C++ runtimes (glibc, with its vector
# math libmvec, is the system's; a program built against an older libstdc++ runs on a newer one,
# not the reverse, and cuDNN, opened at run time, may need the newer), and CUDA's libraries (the
# driver's libcuda, the runtime, cuBLAS, NCCL, cuDNN, NVRTC), which must match the target's
# driver and are there wherever CUDA programs run.
# scripts/gpu_check.sh puts build/lib on the library path.
set -euo pipefail

build=${1:?usage: scripts/bundle.sh BUILD_DIR OUT.tar.xz}
out=${2:?usage: scripts/bundle.sh BUILD_DIR OUT.tar.xz}
[ -f configs/tiny.json ] || { echo "bundle.sh: run it from the repository root" >&2; exit 2; }
[ -x "$build/lmtrain" ] || { echo "bundle.sh: $build/lmtrain is missing: make build first" >&2; exit 1; }
[ -f data/tiny/meta.json ] || { echo "bundle.sh: data/tiny is missing: make data first" >&2; exit 1; }
programs=(lmtrain)
[ -x "$build/tests/lmtrain_gpu_tests" ] && programs+=(tests/lmtrain_gpu_tests)

# Whatever BUILD_DIR is called here, the tarball holds it as build/ (scripts/gpu_check.sh's
# default), assembled in a staging folder so that the build folder itself is left as it was.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/build/lib" "$stage/build/tests"
for p in "${programs[@]}"; do cp "$build/$p" "$stage/build/$p"; done

left_out='^(linux-vdso|ld-linux-x86-64|libc|libm|libmvec|libdl|libpthread|librt|libresolv|libstdc\+\+|libgcc_s|libcuda|libcudart|libcublas|libcublasLt|libnccl|libcudnn|libnvrtc)\.so'
libraries=$(cd "$build" && ldd "${programs[@]}")
if grep "not found" <<<"$libraries"; then
  echo "bundle.sh: the programs need libraries this machine lacks (above)" >&2
  exit 1
fi
awk '$2 == "=>" && $3 ~ /^\// { print $1, $3 }' <<<"$libraries" | sort -u |
  while read -r name path; do
    grep -qE "$left_out" <<<"$name" || cp -L "$path" "$stage/build/lib/$name"
  done

# Which commit the programs were built from: a checkout of another one has other goldens,
# configs and tests, and scripts/gpu_check.sh says so.
{
  git rev-parse HEAD
  git status --porcelain --untracked-files=no | grep -q . && echo "with uncommitted changes" || true
} >"$stage/build/bundle-commit"

mkdir -p "$(dirname "$out")"
tar -c -I "xz -T0" -f "$out" --owner=0 --group=0 -C "$stage" build -C "$PWD" data/tiny
echo "bundle.sh: $out ($(du -h "$out" | cut -f1)): build/ with ${programs[*]} and" \
  "$(ls "$stage/build/lib" | wc -l) libraries in build/lib, data/tiny"
