#!/usr/bin/env python3
"""The benchmark's plumbing (scripts/bench/run.py) on the CPU, so that it works the first time a
GPU runs it: lmtrain's batch search on out of memory, the reference's fallback to a smaller
batch, the repeated lmtrain run there, the op profile, a variant, results.json and results.md.

lmtrain runs for real (CPU backend, a 2-layer model). Two stand-ins make the GPU-only branches
happen: a wrapper around lmtrain that fails with lmtrain's out-of-memory line at batch 16, and an
interpreter for the reference that, instead of running torch_gpt.py, writes the result JSON
torch_gpt.py writes: out of memory above batch 4, else fixed numbers.

Usage: bench_script_test.py LMTRAIN   (run from the repository root; ctest does)
"""

import json
import os
import stat
import subprocess
import sys
import tempfile

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
RUN_PY = os.path.join(REPO, "scripts", "bench", "run.py")

FAKE_REFERENCE = r'''#!/usr/bin/env python3
import json, sys
if sys.argv[1] == "-c":  # run.py's probe for torch and the device
    print("2.9.0 True")
    sys.exit(0)
args = sys.argv[2:]
value = lambda flag: args[args.index(flag) + 1]
batch, out = int(value("--device-batch")), value("--json-out")
if batch > 4:
    result, code = {"status": "oom", "error": "CUDA out of memory (stand-in)"}, 3
else:
    ms = {"mean": 40.0, "median": 40.0, "min": 39.0, "max": 41.0}
    result, code = {"status": "ok", "tokens_per_second": batch * int(value("--seq-len")) / 0.04,
                    "mfu": 0.25, "step_ms": ms, "optimizer_ms": {**ms, "median": 4.0},
                    "peak_memory_bytes": 2**30, "peak_memory_reserved_bytes": 2**31,
                    "loss_first": 9.0, "loss_last": 8.5, "flops_per_token": 1e6,
                    "device": "stand-in", "torch_version": "2.9.0",
                    "settings": {"device_batch": batch}}, 0
with open(out, "w") as f:
    json.dump(result, f)
sys.exit(code)
'''


# What the CUDA backend logs about its matmul algorithms, which the results must carry.
MATMUL_LINE = ("Stand-in GPU (2 SMs) with cuBLASLt 1: matmul algorithms from the table, else "
               "cuBLASLt's first suggestion (3 shapes from configs/matmul/stand-in.json)")


def write_executable(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(what)


def main() -> int:
    lmtrain = os.path.abspath(sys.argv[1])
    with tempfile.TemporaryDirectory(prefix="bench-script-test-") as tmp:
        wrapper = os.path.join(tmp, "lmtrain")
        env_seen = os.path.join(tmp, "env_seen")  # what the runs got of the env variant
        write_executable(wrapper, f"""#!/bin/bash
if [ -n "$LMTRAIN_CUDA_SYNC" ]; then echo "$LMTRAIN_CUDA_SYNC" >> {env_seen}; fi
echo "[2026-11-24 10:00:00.000] [info] {MATMUL_LINE}"
for arg in "$@"; do
  if [ "$arg" = batch.device_batch=16 ]; then
    echo "error: out of memory: batch.device_batch 16 (stand-in)"; exit 1
  fi
done
exec {lmtrain} "$@"
""")
        reference = os.path.join(tmp, "python")
        write_executable(reference, FAKE_REFERENCE)
        out = os.path.join(tmp, "results")
        cmd = [sys.executable, RUN_PY, "--lmtrain", wrapper, "--python", reference,
               "--backend", "cpu", "--configs", "d2", "--seq-len", "64", "--head-dim", "32",
               "--batches", "16,8,4", "--steps", "4", "--warmup-steps", "1",
               "--profile-start", "2", "--profile-steps", "2", "--budget-s", "600",
               "--variant", "chunk=run.loss_chunk_rows=64",
               "--variant", "env=LMTRAIN_CUDA_SYNC=1",  # an environment variant (no-op on a CPU)
               "--out", out]
        run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        print(run.stdout[-4000:], run.stderr[-4000:])
        expect(run.returncode == 0, f"run.py exited {run.returncode}")

        with open(os.path.join(out, "results.json")) as f:
            results = json.load(f)
        (row,) = results["rows"]
        statuses = [(t["batch"], t["status"]) for t in row["attempts"]]
        expect(statuses == [(16, "oom"), (8, "ok")], f"lmtrain batch search: {statuses}")
        torch_runs = [(t["batch"], t["status"]) for t in row["torch_attempts"]]
        expect(torch_runs == [(8, "oom"), (4, "ok")], f"reference fallback: {torch_runs}")
        expect(row["batch"] == 4 and row["lmtrain"]["batch"] == 4 and row["torch"]["batch"] == 4,
               "the compared pair runs at the reference's batch")
        expect(row["lmtrain_largest"]["batch"] == 8, "lmtrain's largest batch is kept")
        lm = row["lmtrain"]
        expect(lm["status"] == "ok" and lm["timed_steps"] == 3, f"lmtrain run: {lm}")
        expect(lm["tokens_per_second"] > 0 and lm["peak_memory_bytes"] > 0, "lmtrain numbers")
        expect(lm["loss_first"] > lm["loss_last"] > 0, "lmtrain's loss falls")
        expect(lm["backend"] == [MATMUL_LINE], f"lmtrain's backend lines: {lm['backend']}")
        profile = row["profile"]
        expect(profile["status"] == "ok" and profile["complete"] and
               (profile["first_step"], profile["last_step"]) == (2, 3), f"profile: {profile}")
        expect({p["phase"] for p in profile["phases"]} >= {"forward", "backward", "optimizer"},
               "profile phases")
        variants = {v["name"]: v for v in row["variants"]}
        expect(variants.keys() == {"chunk", "env"}, f"variants: {list(variants)}")
        expect(variants["chunk"]["set"] == {"run.loss_chunk_rows": "64"} and
               variants["env"]["env"] == {"LMTRAIN_CUDA_SYNC": "1"}, "variant settings")
        for v in variants.values():
            expect(v["status"] == "ok" and v["ratio_to_base"] > 0, f"variant: {v}")
        with open(env_seen) as f:
            expect(f.read() == "1\n", "the env variant's run, and only it, got its environment")

        with open(os.path.join(out, "results.md")) as f:
            md = f.read()
        ratio = lm["tokens_per_second"] / row["torch"]["tokens_per_second"]
        expect(f"| d2 | 4 |" in md and f"| {ratio:.2f} |" in md, "results.md: the matched row")
        expect("the reference ran out of memory at B=8" in md, "results.md: the fallback note")
        expect(f"lmtrain d2 B=4: {MATMUL_LINE}" in md, "results.md: the backend lines")
        expect("### Variants: d2, batch 4" in md and "### Op profile: d2, batch 4" in md,
               "results.md: variants and profile")

        # The summary of a kept profile on its own, and a missing binary (exit 2).
        summary = subprocess.run([sys.executable, RUN_PY, "--summarize-profile",
                                  os.path.join(out, profile["file"])],
                                 cwd=REPO, capture_output=True, text=True)
        expect(summary.returncode == 0 and "Op profile" in summary.stdout, "--summarize-profile")
        missing = subprocess.run([sys.executable, RUN_PY, "--lmtrain", os.path.join(tmp, "none"),
                                  "--skip-torch", "--out", out], cwd=REPO, capture_output=True,
                                 text=True)
        expect(missing.returncode == 2 and "no lmtrain binary" in missing.stderr,
               f"missing binary: {missing.returncode} {missing.stderr}")
    print("bench script: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
