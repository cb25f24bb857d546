#!/usr/bin/env python3
"""scripts/prepare_data.py on inputs too small for its hash split: each split gets a document
when there are two or more, and one document is refused in one line, with nothing written.

Usage: prepare_data_test.py   (run from the repository root; ctest does)
"""

import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PREPARE = os.path.join(REPO, "scripts", "prepare_data.py")
FAILURES = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        FAILURES.append(what)


def prepare(tmp, docs, fraction):
    """Writes docs as jsonl and prepares them; returns (exit code, stderr, meta or None)."""
    src, out = os.path.join(tmp, "docs.jsonl"), os.path.join(tmp, "out")
    with open(src, "w", encoding="utf-8") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")
    r = subprocess.run([sys.executable, PREPARE, "--input", src, "--format", "jsonl", "--out", out,
                        "--vocab-size", "300", "--val-fraction", str(fraction), "--force"],
                       capture_output=True, text=True)
    meta_path = os.path.join(out, "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else None
    return r.returncode, r.stderr, meta


def main():
    docs = [f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i + 3)
            for i in range(6)]
    for fraction, side in ((1.0, "every document hashes into val"),
                           (0.0, "no document hashes into val")):
        with tempfile.TemporaryDirectory() as tmp:
            code, err, meta = prepare(tmp, docs, fraction)
            splits = meta["splits"] if meta else {}
            check(code == 0 and splits.get("train", {}).get("documents", 0) >= 1
                  and splits.get("val", {}).get("documents", 0) >= 1,
                  f"{side}: both splits get documents (exit {code}, {splits or err.strip()})")
    with tempfile.TemporaryDirectory() as tmp:
        code, err, meta = prepare(tmp, docs[:1], 0.5)
        check(code != 0 and "need at least 2 documents" in err and meta is None,
              f"one document is refused (exit {code}: {err.strip()})")
    print(f"\n{len(FAILURES)} failure(s)" if FAILURES else "\nall checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
