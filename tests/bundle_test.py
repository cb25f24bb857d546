#!/usr/bin/env python3
"""scripts/bundle.sh and the start of scripts/gpu_check.sh, on the CPU.

The bundle, unpacked elsewhere, must hold the programs, the default corpus, the commit they were
built from and every shared library they load but the C/C++ runtime and CUDA's: with only the
bundle's lib/ on the library path, each other library resolves into it, and lmtrain runs.
gpu_check.sh must refuse an unknown step, and on a machine without a GPU stop before the first
step, saying so, after listing where the CUDA libraries would come from.

Usage: bundle_test.py BUILD_DIR   (run from the repository root; ctest does)
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile


def expect(condition: bool, what: str) -> None:
    if not condition:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def system_libraries() -> re.Pattern:
    """What a GPU machine brings itself: the pattern scripts/bundle.sh leaves out (it says why)."""
    with open("scripts/bundle.sh") as script:
        found = re.search(r"^left_out='([^']+)'$", script.read(), re.MULTILINE)
    expect(found is not None, "scripts/bundle.sh has no left_out='...' line")
    return re.compile(found.group(1))


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def main() -> int:
    build = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        tarball = os.path.join(tmp, "bundle.tar.xz")
        r = run(["scripts/bundle.sh", build, tarball])
        expect(r.returncode == 0, f"bundle.sh exited {r.returncode}: {r.stderr}")
        unpacked = os.path.join(tmp, "checkout")
        os.makedirs(unpacked)
        expect(run(["tar", "-xJf", tarball, "-C", unpacked]).returncode == 0, "the tarball unpacks")
        lmtrain = os.path.join(unpacked, "build", "lmtrain")  # build/, whatever BUILD_DIR is
        lib = os.path.join(unpacked, "build", "lib")
        expect(os.access(lmtrain, os.X_OK), "the bundle holds lmtrain")
        expect(not os.path.exists(os.path.join(build, "lib")), "the build folder is left as it was")
        for f in ("meta.json", "tokenizer.json", "train_000000.bin", "val_000000.bin"):
            expect(os.path.isfile(os.path.join(unpacked, "data", "tiny", f)), f"data/tiny/{f}")
        head = run(["git", "rev-parse", "HEAD"]).stdout.strip()
        with open(os.path.join(unpacked, "build", "bundle-commit")) as f:
            expect(f.readline().strip() == head, "bundle-commit names the commit built from")

        env = {**os.environ, "LD_LIBRARY_PATH": lib}
        programs = [lmtrain]
        if os.path.exists(os.path.join(build, "tests", "lmtrain_gpu_tests")):
            programs.append(os.path.join(unpacked, "build", "tests", "lmtrain_gpu_tests"))
        expect(len(programs) == 1 or os.access(programs[1], os.X_OK), "the GPU tests came along")
        bundled = set(os.listdir(lib))
        system = system_libraries()
        for program in programs:
            for line in run(["ldd", program], env=env).stdout.splitlines():
                parts = line.split()
                expect("not found" not in line, f"{program}: {line.strip()}")
                if len(parts) < 3 or parts[1] != "=>" or system.match(parts[0]):
                    continue
                expect(parts[0] in bundled and os.path.dirname(parts[2]) == lib,
                       f"{program} loads {parts[0]} from {parts[2]}, not from the bundle")
        r = run([lmtrain, "--help"], env=env)
        expect(r.returncode == 0 and "train" in r.stdout, f"the bundled lmtrain runs: {r.stderr}")

        r = run(["scripts/gpu_check.sh", "no-such-step"])
        expect(r.returncode == 2 and "unknown step" in r.stderr, "gpu_check.sh refuses a typo")
        if shutil.which("nvidia-smi") is None:
            out = os.path.join(tmp, "gpu-check")
            r = run(["scripts/gpu_check.sh", "--build", build, "--out", out, "tests"])
            expect(r.returncode == 1 and "no GPU" in r.stdout, f"gpu_check.sh without a GPU: {r}")
            expect("libcudnn.so.9:" in r.stdout and not os.path.exists(os.path.join(out, "tests.log")),
                   "it lists the CUDA libraries and runs no step")
    print("bundle and gpu_check.sh: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
