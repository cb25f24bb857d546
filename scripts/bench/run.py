#!/usr/bin/env python3
"""Throughput benchmark: lmtrain against the PyTorch reference (scripts/bench/torch_gpt.py).

For each config (d12, d20: depth 12/20, aspect 64, head_dim 128, T=2048, the vocabulary of
data/tiny) it finds the largest device batch lmtrain fits (128, 96, 64, 48, 32, 24, 16, 12, 8, 4: a
run that dies with an out-of-memory error moves to the next smaller), runs `lmtrain train` at that batch with no
gradient accumulation (total_batch_tokens = B*T) on the data/tiny shards, reads its
metrics.jsonl, runs the reference at the same batch on the same shards, and prints a table.
When the reference runs out of memory there, it is tried at the smaller batches that follow in
--batches until one fits; lmtrain's timed run is then repeated at that batch, and that pair is the
config's comparison (lmtrain's run at its largest batch is kept and reported as well).
The first --warmup-steps steps of both are left out. Then one short lmtrain run at that batch
times every op (run.profile_steps) and its op_profile.json is summarised: the top ops by time
per step and the per-phase totals (--no-profile skips it). Last, each --variant runs lmtrain
once more at that batch with its own config overrides and environment, compared with the base
run. Results go to --out (bench-results/): results.md, results.json, and every run's log.

Usage (the Makefile's `make bench` passes --lmtrain $(BUILD)/lmtrain):
  python3 scripts/bench/run.py [--quick] [--configs d12,d20] [--steps 30] [--budget-s 480]
  python3 scripts/bench/run.py --quick --skip-torch --no-profile \
      --variant nondet=LMTRAIN_CUDNN_ATTENTION=nondeterministic \
      --variant recompute=run.recompute_activations=true   # lmtrain alternatives (docs/BENCHMARKS.md)
  python3 scripts/bench/run.py --summarize-profile runs/NAME/op_profile.json   # just the summary

Exit code 0 when every config ran on both sides, 1 when something failed (the table says what),
2 when a prerequisite (binary, data, config) is missing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
BENCH_CONFIG = os.path.join(HERE, "lmtrain_bench.json")
TORCH_GPT = os.path.join(HERE, "torch_gpt.py")

# What lmtrain's CUDA backend prints when memory runs out (cudaMalloc -> "out of memory"),
# and what cuBLAS / the driver say in the same situation.
OOM_PATTERN = re.compile(r"out of memory|cudaErrorMemoryAllocation|CUDA_ERROR_OUT_OF_MEMORY|"
                         r"CUBLAS_STATUS_ALLOC_FAILED", re.IGNORECASE)
TORCH_EXIT_OOM = 3
MIN_RUN_SECONDS = 20  # do not start a run with less budget left than this
# lmtrain's log lines that say how the GPU backend runs (the cuDNN and its attention backward,
# where the matmul algorithms come from): results must say what was measured.
BACKEND_LINE = re.compile(r"(cuDNN attention: .*|\S.*: matmul algorithms .*)$")
LOG_PREFIX = re.compile(r"^\[[^\]]*\] \[[a-z]+\] ")  # spdlog's "[time] [level] "


class Prerequisite(Exception):
    """A missing binary, data set or config: nothing can run."""


class BadMetrics(Exception):
    """metrics.jsonl is missing, malformed or too short."""


class BadProfile(Exception):
    """op_profile.json is missing or malformed."""


# --------------------------------------------------------------------------
# Running commands with a time limit
# --------------------------------------------------------------------------

def run_logged(cmd: list[str], log_path: str, timeout: float, cwd: str = REPO,
               env: dict | None = None) -> tuple[int | None, float]:
    """Runs cmd with stdout+stderr to log_path. Returns (exit code or None on timeout, seconds).

    The child gets its own process group; on timeout that group (and only it) gets SIGTERM,
    then SIGKILL after 15 s.
    """
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
        try:
            code = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            log.write(f"\n[run.py] killed after the {timeout:.0f} s limit\n")
            code = None
    return code, time.monotonic() - start


def tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"(cannot read {path}: {e})"


def backend_lines(path: str) -> list[str]:
    """The BACKEND_LINE lines of a log, once each, without spdlog's prefix."""
    found = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                line = LOG_PREFIX.sub("", line.rstrip("\n"))
                if BACKEND_LINE.match(line) and line not in found:
                    found.append(line)
    except OSError:
        pass
    return found


def report_run(a, label: str, r: dict, ok_detail, failure_lines: int = 25) -> None:
    """One status line for a run (ok_detail(r) adds to it when the run succeeded), and the tail
    of its log when it failed or timed out."""
    print(f"{label}: {r['status']}"
          + (f" ({r['reason']})" if r.get("reason") else "")
          + (ok_detail(r) if r["status"] == "ok" else "")
          + (f" [{r['seconds']} s]" if "seconds" in r else ""), flush=True)
    if r["status"] in ("failed", "timeout"):
        log = os.path.join(a.out, r["log"])
        print(f"--- {label} {r['status']}: last {failure_lines} lines of {log} ---", flush=True)
        print(tail(log, failure_lines).rstrip(), flush=True)
        print("---", flush=True)


# --------------------------------------------------------------------------
# lmtrain metrics.jsonl
# --------------------------------------------------------------------------

STEP_KEYS = ("step", "train_loss", "tokens_per_second", "step_ms", "optimizer_ms")


def parse_metrics(path: str) -> tuple[list[dict], int | None]:
    """Step records (those with train_loss) in order, and peak_memory_bytes if logged."""
    if not os.path.isfile(path):
        raise BadMetrics(f"{path}: not written")
    steps, peak = [], None
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadMetrics(f"{path}:{lineno}: not JSON ({e})") from None
            if not isinstance(rec, dict):
                raise BadMetrics(f"{path}:{lineno}: not a JSON object")
            if "peak_memory_bytes" in rec:
                peak = rec["peak_memory_bytes"]
            elif "train_loss" in rec:
                missing = [k for k in STEP_KEYS if not isinstance(rec.get(k), (int, float))]
                if missing:
                    raise BadMetrics(f"{path}:{lineno}: step record lacks numeric {missing}")
                steps.append(rec)
    for i, rec in enumerate(steps):
        if rec["step"] != i + 1:
            raise BadMetrics(f"{path}: step records are not 1, 2, 3, ...: record {i + 1} is step {rec['step']}")
    return steps, peak


def summarize_steps(steps: list[dict], warmup: int, batch_tokens: int) -> dict:
    """Steady-state summary of step records (step_ms, optimizer_ms, train_loss, optional mfu)."""
    timed = [s for s in steps if s["step"] > warmup]
    if len(timed) < 2:
        raise BadMetrics(f"only {len(timed)} step(s) after the {warmup} warmup steps")

    def stats(key):
        v = sorted(s[key] for s in timed)
        n = len(v)
        med = v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])
        return {"mean": sum(v) / n, "median": med, "min": v[0], "max": v[-1]}

    total_s = sum(s["step_ms"] for s in timed) / 1e3
    tps = batch_tokens * len(timed) / total_s
    out = {"tokens_per_second": tps, "step_ms": stats("step_ms"), "optimizer_ms": stats("optimizer_ms"),
           "timed_steps": len(timed), "loss_first": steps[0]["train_loss"],
           "loss_last": steps[-1]["train_loss"], "mfu": None}
    # lmtrain logs mfu = flops_per_token * tokens_per_second / peak per step: the ratio gives
    # its flops_per_token / peak, applied to the steady-state rate.
    if all(isinstance(s.get("mfu"), (int, float)) and s["tokens_per_second"] > 0 for s in timed):
        out["mfu"] = timed[-1]["mfu"] / timed[-1]["tokens_per_second"] * tps
    # The logged rate must agree with the batch we asked for.
    implied = timed[-1]["tokens_per_second"] * timed[-1]["step_ms"] / 1e3
    if abs(implied / batch_tokens - 1) > 1e-3:
        raise BadMetrics(f"tokens_per_second x step_ms = {implied:.0f} tokens per step, "
                         f"expected {batch_tokens}")
    return out


# --------------------------------------------------------------------------
# One config: lmtrain batch search, then the reference
# --------------------------------------------------------------------------

def lmtrain_command(a, depth: int, B: int, run_dir: str, name: str, steps: int | None = None,
                    extra: dict | None = None) -> list[str]:
    T = a.seq_len
    sets = {
        "model.depth": depth, "model.sequence_len": T, "model.head_dim": a.head_dim,
        "model.aspect_ratio": a.aspect_ratio,
        "batch.device_batch": B, "batch.total_batch_tokens": B * T,
        "schedule.num_iterations": steps or a.steps,
        "eval.every": -1, "eval.sample_tokens": 0, "checkpoint.save_final": "false",
        "run.backend": a.backend, "run.dtype": "bf16", "run.out_dir": run_dir, "run.name": name,
        "data.train": a.data, "data.val": a.data, "data.tokenizer": a.tokenizer,
        **(extra or {}),
    }
    cmd = [a.lmtrain, "train", "--config", BENCH_CONFIG]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


def lmtrain_job(a, depth: int, B: int, deadline: float, name: str, collect,
                steps: int | None = None, extra: dict | None = None, env: dict | None = None) -> dict:
    """Runs lmtrain for one config and batch in a scratch output directory, within the budget,
    with `extra` config overrides and `env` added to the environment; when it exits 0,
    collect(run_dir, res) reads what it wrote and returns the result."""
    log = os.path.join(a.out, "logs", f"lmtrain-{name}.log")
    remaining = deadline - time.monotonic()
    if remaining < MIN_RUN_SECONDS:
        return {"status": "skipped", "batch": B, "reason": "time budget spent"}
    tmp = tempfile.mkdtemp(prefix="lmtrain-bench-")
    try:
        limit = min(a.lmtrain_timeout, remaining)
        code, secs = run_logged(lmtrain_command(a, depth, B, tmp, name, steps, extra), log, limit,
                                env={**os.environ, **env} if env else None)
        res = {"batch": B, "seconds": round(secs, 1), "log": os.path.relpath(log, a.out)}
        if code is None:
            return {**res, "status": "timeout", "reason": f"over {limit:.0f} s"}
        if code != 0:
            if OOM_PATTERN.search(tail(log, 60)):
                return {**res, "status": "oom"}
            return {**res, "status": "failed", "reason": f"exit code {code}"}
        return collect(os.path.join(tmp, name), res)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_lmtrain(a, depth: int, B: int, deadline: float, variant: dict | None = None) -> dict:
    """The timed run: the bench's settings, or those with a --variant's overrides."""
    name = f"d{depth}-b{B}" + (f"-variant-{variant['name']}" if variant else "")

    def collect(run_dir: str, res: dict) -> dict:
        metrics = os.path.join(run_dir, "metrics.jsonl")
        try:
            steps, peak = parse_metrics(metrics)
            shutil.copy(metrics, os.path.join(a.out, "logs", f"lmtrain-{name}.metrics.jsonl"))
            if len(steps) != a.steps:
                raise BadMetrics(f"{len(steps)} step records, expected {a.steps}")
            summary = summarize_steps(steps, a.warmup_steps, B * a.seq_len)
        except BadMetrics as e:
            return {**res, "status": "failed", "reason": f"metrics: {e}"}
        return {**res, "status": "ok", "peak_memory_bytes": peak, **summary,
                "backend": backend_lines(os.path.join(a.out, res["log"]))}

    v = variant or {}
    return lmtrain_job(a, depth, B, deadline, name, collect, extra=v.get("set"), env=v.get("env"))


def run_torch(a, depth: int, B: int, deadline: float) -> dict:
    name = f"d{depth}-b{B}"
    log = os.path.join(a.out, "logs", f"torch-{name}.log")
    out_json = os.path.join(a.out, "logs", f"torch-{name}.json")
    remaining = deadline - time.monotonic()
    if remaining < MIN_RUN_SECONDS:
        return {"status": "skipped", "batch": B, "reason": "time budget spent"}
    cmd = [a.python, TORCH_GPT, "--depth", str(depth), "--seq-len", str(a.seq_len),
           "--head-dim", str(a.head_dim), "--aspect-ratio", str(a.aspect_ratio),
           "--device-batch", str(B), "--total-batch-tokens", str(B * a.seq_len),
           "--steps", str(a.steps), "--warmup-steps", str(a.warmup_steps),
           "--data", a.data, "--tokenizer", a.tokenizer, "--optim-config", BENCH_CONFIG,
           "--device", a.torch_device, "--json-out", out_json] + shlex.split(a.torch_args)
    if os.path.exists(out_json):
        os.remove(out_json)
    code, secs = run_logged(cmd, log, min(a.torch_timeout, remaining))
    res = {"batch": B, "seconds": round(secs, 1), "log": os.path.relpath(log, a.out)}
    if code is None:
        return {**res, "status": "timeout", "reason": f"over {min(a.torch_timeout, remaining):.0f} s"}
    try:
        with open(out_json) as f:
            result = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return {**res, "status": "failed", "reason": f"exit code {code}, no result JSON ({e})"}
    if code == TORCH_EXIT_OOM or result.get("status") == "oom":
        return {**res, "status": "oom", "reason": result.get("error", "")}
    if code != 0 or result.get("status") != "ok":
        return {**res, "status": "failed", "reason": f"exit code {code}: {result.get('error', '')}"}
    keep = ("tokens_per_second", "mfu", "step_ms", "optimizer_ms", "peak_memory_bytes",
            "peak_memory_reserved_bytes", "loss_first", "loss_last", "flops_per_token", "device",
            "torch_version", "settings")
    return {**res, "status": "ok", **{k: result[k] for k in keep}}


# --------------------------------------------------------------------------
# The op profile: one short lmtrain run with run.profile_steps at the chosen batch
# --------------------------------------------------------------------------

def short(v: float) -> str:
    """A rate to about three significant digits: 312, 45.2, 0.093."""
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2g}"


def summarize_op_profile(report: dict, top: int = 10) -> dict:
    """The per-step totals, the phases and the `top` ops by time of an op_profile.json."""
    try:
        ops = sorted(report["ops"], key=lambda o: -o["ms_per_step"])
        summary = {
            "profiled_steps": int(report["profiled_steps"]), "complete": bool(report["complete"]),
            "first_step": report["steps"][0]["step"] if report["steps"] else None,
            "last_step": report["steps"][-1]["step"] if report["steps"] else None,
            "step_wall_ms": float(report["step_wall_ms"]), "op_ms": float(report["op_ms"]),
            "outside_ops_ms": float(report["outside_ops_ms"]),
            "phases": [{k: p[k] for k in ("phase", "ms_per_step", "percent", "calls_per_step")}
                       for p in report["phases"]],
            "labels": len(ops),
            "top_ops": [],
        }
        for o in ops[:top]:
            rate = (f"{short(o['tflop_per_s'])} TFLOP/s" if o.get("tflop_per_s") is not None else
                    f"{short(o['gb_per_s'])} GB/s" if o.get("gb_per_s") is not None else "")
            summary["top_ops"].append({
                **{k: o[k] for k in ("phase", "op", "key", "calls_per_step", "ms_per_step", "percent")},
                "rate": rate})
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise BadProfile(f"unexpected op_profile.json layout ({type(e).__name__}: {e})") from None
    return summary


def render_profile_markdown(title: str, p: dict) -> list[str]:
    """Markdown lines for one summarize_op_profile() result."""
    wall, op = p["step_wall_ms"], p["op_ms"]
    lines = [f"### Op profile: {title}, steps {p['first_step']}-{p['last_step']}"
             + ("" if p["complete"] else " (the run ended inside the profile window)"), "",
             f"Per step: {op:.1f} ms of op time (device time between events around each op) in "
             f"{wall:.1f} ms of wall time; {wall - op:.1f} ms "
             f"({100 * (wall - op) / wall if wall > 0 else 0:.1f}%) outside the ops.", "",
             "| phase | ms/step | % of op time | calls/step |", "|---|---|---|---|"]
    for ph in p["phases"]:
        lines.append(f"| {ph['phase']} | {ph['ms_per_step']:.2f} | {ph['percent']:.1f}% | "
                     f"{ph['calls_per_step']:.0f} |")
    lines += ["", f"Top {len(p['top_ops'])} of {p['labels']} labels by time:", "",
              "| phase | op | shape | calls/step | ms/step | % | rate |", "|---|---|---|---|---|---|---|"]
    for o in p["top_ops"]:
        lines.append(f"| {o['phase']} | {o['op']} | {o['key'] or '—'} | {o['calls_per_step']:g} | "
                     f"{o['ms_per_step']:.3f} | {o['percent']:.1f}% | {o['rate'] or '—'} |")
    return lines


def run_profile(a, depth: int, B: int, deadline: float) -> dict:
    name = f"d{depth}-b{B}-profile"

    def collect(run_dir: str, res: dict) -> dict:
        path = os.path.join(run_dir, "op_profile.json")
        try:
            with open(path) as f:
                report = json.load(f)
            kept = os.path.join(a.out, "logs", f"lmtrain-{name}.op_profile.json")
            shutil.copy(path, kept)
            summary = summarize_op_profile(report, a.profile_top)
        except (OSError, json.JSONDecodeError, BadProfile) as e:
            return {**res, "status": "failed", "reason": f"op_profile.json: {e}"}
        return {**res, "status": "ok", "file": os.path.relpath(kept, a.out), **summary}

    steps = a.profile_start + a.profile_steps - 1
    extra = {"run.profile_start": a.profile_start, "run.profile_steps": a.profile_steps}
    return lmtrain_job(a, depth, B, deadline, name, collect, steps, extra)


def bench_config(a, depth: int, deadline: float) -> dict:
    row = {"config": f"d{depth}", "depth": depth, "batch": None, "attempts": [],
           "lmtrain": None, "torch": None, "profile": None}
    print(f"\n=== d{depth}: lmtrain batch search {a.batches} ===", flush=True)
    for B in a.batches:
        r = timed_lmtrain(a, depth, B, deadline)
        row["attempts"].append({k: r.get(k) for k in ("batch", "status", "seconds", "reason")})
        if r["status"] == "oom":
            continue
        row["lmtrain"] = r
        break
    else:
        row["lmtrain"] = {"status": "oom", "reason": f"out of memory at every batch {a.batches}"}
    lm = row["lmtrain"]
    row["batch"] = lm.get("batch")  # where lmtrain ran, or failed for a reason other than memory
    if lm["status"] != "ok":
        row["torch"] = {"status": "skipped", "reason": f"lmtrain {lm['status']}"}
    elif a.skip_torch:
        row["torch"] = {"status": "skipped", "reason": "--skip-torch"}
    else:
        bench_torch(a, depth, row, deadline)  # may move the row to a smaller batch
    lm = row["lmtrain"]
    if lm["status"] != "ok":
        if a.variants:
            row["variants"] = [{**v, "status": "skipped", "reason": f"lmtrain {lm['status']}"}
                               for v in a.variants]
        return row
    if a.no_profile:
        row["profile"] = {"status": "skipped", "reason": "--no-profile"}
    else:
        bench_profile(a, depth, row, deadline)
    if a.variants:
        row["variants"] = [bench_variant(a, depth, row, v, deadline) for v in a.variants]
    return row


def timed_lmtrain(a, depth: int, B: int, deadline: float) -> dict:
    """run_lmtrain with the bench's settings, and its status line."""
    r = run_lmtrain(a, depth, B, deadline)
    report_run(a, f"lmtrain d{depth} B={B}", r, lambda r: f", {r['tokens_per_second']:.0f} tok/s")
    return r


def bench_profile(a, depth: int, row: dict, deadline: float) -> None:
    print(f"=== d{depth}: lmtrain op profile at B={row['batch']} (steps {a.profile_start}.."
          f"{a.profile_start + a.profile_steps - 1}) ===", flush=True)
    p = run_profile(a, depth, row["batch"], deadline)
    row["profile"] = p
    report_run(a, f"profile d{depth} B={row['batch']}", p,
               lambda p: f", {p['op_ms']:.1f} ms of ops in {p['step_wall_ms']:.1f} ms per step")


def bench_torch(a, depth: int, row: dict, deadline: float) -> None:
    """The reference at the row's batch (lmtrain's largest). When it runs out of memory there,
    it tries the smaller batches that follow in --batches, in order, until one fits or a run ends
    otherwise (time budget spent, failed, timed out). Where it fits below lmtrain's batch, lmtrain's
    timed run is repeated at that batch, and that pair becomes the row: row["batch"], "lmtrain"
    and "torch"; the run at the larger batch moves to row["lmtrain_largest"]. Otherwise
    row["torch"] is the reference's result at lmtrain's batch. With more than one reference run,
    all of them are in row["torch_attempts"]."""
    B = row["batch"]
    runs = []
    for tb in [B] + [b for b in a.batches[a.batches.index(B) + 1:] if b < B]:
        print(f"=== d{depth}: torch reference at B={tb} ===", flush=True)
        t = run_torch(a, depth, tb, deadline)
        report_run(a, f"torch d{depth} B={tb}", t,
                   lambda t: f", {t['tokens_per_second']:.0f} tok/s", failure_lines=40)
        runs.append(t)
        if t["status"] != "oom":
            break
    row["torch"] = t if t["status"] == "ok" else runs[0]
    if len(runs) > 1:
        row["torch_attempts"] = [{k: r.get(k) for k in ("batch", "status", "seconds", "reason", "log")}
                                 for r in runs]
    if row["torch"]["batch"] != B:
        print(f"=== d{depth}: lmtrain at B={tb}, where the reference fits ===", flush=True)
        row["lmtrain_largest"], row["batch"] = row["lmtrain"], tb
        row["lmtrain"] = timed_lmtrain(a, depth, tb, deadline)


def first_error(log_path: str) -> str | None:
    """The one line lmtrain prints for the error that stopped it ("error: ..."), if any."""
    try:
        with open(log_path, errors="replace") as f:
            return next((line.strip() for line in f if line.startswith("error:")), None)
    except OSError:
        return None


def bench_variant(a, depth: int, row: dict, v: dict, deadline: float) -> dict:
    """One --variant at the base run's batch; the result is v with the run's summary added."""
    B = row["batch"]
    print(f"=== d{depth}: variant {v['name']} at B={B}: {v['spec'] or '(base settings)'} ===", flush=True)
    r = run_lmtrain(a, depth, B, deadline, v)
    if r["status"] in ("oom", "failed"):
        error = first_error(os.path.join(a.out, r["log"]))
        if error:
            r["reason"] = f"{r['reason']}: {error}" if r.get("reason") else error
    if r["status"] == "ok":
        r["ratio_to_base"] = r["tokens_per_second"] / row["lmtrain"]["tokens_per_second"]
    report_run(a, f"variant {v['name']} d{depth} B={B}", r,
               lambda r: f", {r['tokens_per_second']:.0f} tok/s, {r['ratio_to_base']:.3f}x base")
    return {**v, **r}


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def fmt_num(v, spec: str = ",.0f", none: str = "—") -> str:
    return none if v is None else format(v, spec)


def fmt_pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def fmt_gib(v) -> str:
    return "—" if v is None else f"{v / 2**30:.1f} GiB"


def cell(side: dict | None, fn) -> str:
    if not side:
        return "—"
    if side.get("status") != "ok":
        return side.get("status", "?").upper()
    return fn(side)


def render_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"Benchmark {meta['date']} on {meta['gpu']}, commit {meta['commit']}; "
             f"T={meta['settings']['seq_len']}, {meta['settings']['steps']} steps, first "
             f"{meta['settings']['warmup_steps']} excluded, no gradient accumulation, bf16.", ""]
    for r in rows:
        lm = r["lmtrain"]
        if lm and lm.get("backend"):
            lines += [f"lmtrain {r['config']} B={lm['batch']}: " + "; ".join(lm["backend"]), ""]
    hdr = ["config", "batch", "tok/s lmtrain", "tok/s torch", "ratio", "MFU lmtrain", "MFU torch",
           "peak mem lmtrain", "peak mem torch", "opt ms lmtrain", "opt ms torch",
           "step ms lmtrain", "step ms torch", "loss lmtrain", "loss torch"]
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|" + "---|" * len(hdr))
    docs_rows = []
    for r in table_rows(rows):
        lm, to = r["lmtrain"], r["torch"]
        both = lm and to and lm.get("status") == "ok" and to.get("status") == "ok"
        ratio = f"{lm['tokens_per_second'] / to['tokens_per_second']:.2f}" if both else "—"
        loss = lambda s: f"{s['loss_first']:.3f} → {s['loss_last']:.3f}"  # noqa: E731
        vals = [r["config"], fmt_num(r["batch"], "d"),
                cell(lm, lambda s: fmt_num(s["tokens_per_second"])),
                cell(to, lambda s: fmt_num(s["tokens_per_second"])), ratio,
                cell(lm, lambda s: fmt_pct(s["mfu"])), cell(to, lambda s: fmt_pct(s["mfu"])),
                cell(lm, lambda s: fmt_gib(s["peak_memory_bytes"])),
                cell(to, lambda s: fmt_gib(s["peak_memory_bytes"])),
                cell(lm, lambda s: f"{s['optimizer_ms']['median']:.1f}"),
                cell(to, lambda s: f"{s['optimizer_ms']['median']:.1f}"),
                cell(lm, lambda s: f"{s['step_ms']['median']:.1f}"),
                cell(to, lambda s: f"{s['step_ms']['median']:.1f}"),
                cell(lm, loss), cell(to, loss)]
        lines.append("| " + " | ".join(vals) + " |")
        docs_rows.append("| " + " | ".join([
            meta["date"][:10], meta["gpu"], meta["commit"], r["config"], fmt_num(r["batch"], "d"),
            f"{vals[2]} / {vals[3]} / {ratio}", f"{vals[5]} / {vals[6]}", f"{vals[7]} / {vals[8]}",
            f"{vals[9]} / {vals[10]}"]) + " |")
    fallbacks = [fallback_note(r) for r in rows if r.get("torch_attempts")]
    lines += ([""] + fallbacks) if fallbacks else []
    lines += ["", "Times are medians over the timed steps; tok/s is tokens over the summed step "
              "time of the timed steps. OOM / FAILED / TIMEOUT / SKIPPED: see results.json and logs/.",
              "", "Rows for docs/BENCHMARKS.md (lmtrain / torch / ratio):", ""]
    lines += docs_rows
    for r in rows:
        if r.get("variants"):
            lines += [""] + render_variants_markdown(r)
    for r in rows:
        p = r.get("profile")
        if p and p.get("status") == "ok":
            lines += [""] + render_profile_markdown(f"{r['config']}, batch {p['batch']}", p)
    notes = []
    for r in rows:
        sides = [("lmtrain", r["lmtrain"]), ("torch", r["torch"])]
        sides += [(f"torch B={t['batch']}", t) for t in r.get("torch_attempts", [])
                  if t["batch"] != r["batch"]]
        sides += [("profile", r["profile"])] + [(f"variant {v['name']}", v) for v in r.get("variants", [])]
        for side, s in sides:
            if s and s.get("status") != "ok":
                notes.append(f"- {r['config']} {side}: {s.get('status')}"
                             + (f": {s['reason']}" if s.get("reason") else "")
                             + (f" (log: {s['log']})" if s.get("log") else ""))
    if notes:
        lines += ["", "Problems:", ""] + notes
    return "\n".join(lines) + "\n"


def table_rows(rows: list[dict]) -> list[dict]:
    """The table's rows: a config whose reference fitted only at a smaller batch than lmtrain's
    largest gets a row for lmtrain alone at that largest batch (the reference's cells read OOM)
    before its matched row."""
    out = []
    for r in rows:
        if r.get("lmtrain_largest"):
            out.append({**r, "batch": r["lmtrain_largest"]["batch"], "lmtrain": r["lmtrain_largest"],
                        "torch": r["torch_attempts"][0]})
        out.append(r)
    return out


def fallback_note(r: dict) -> str:
    """The line under the table for a config whose reference ran out of memory at lmtrain's batch."""
    first, *smaller = r["torch_attempts"]
    note = (f"{r['config']}: the reference ran out of memory at B={first['batch']}, lmtrain's largest "
            "batch; at smaller batches: " + ", ".join(
                f"B={t['batch']} {t['status'].upper()}" for t in smaller) + ".")
    if r.get("lmtrain_largest"):
        note += f" Both are compared at B={r['batch']}; the B={first['batch']} row is lmtrain alone."
    return note


def render_variants_markdown(r: dict) -> list[str]:
    """Markdown lines comparing a config's --variant runs with its base lmtrain run."""
    base = r["lmtrain"]
    lines = [f"### Variants: {r['config']}, batch {r['batch']}", "",
             "| variant | settings | tok/s | ÷ base | step ms | opt ms | peak mem | final loss |",
             "|---|---|---|---|---|---|---|---|"]
    runs = [("base", "(the lmtrain run above)", base)]
    runs += [(v["name"], f"`{v['spec']}`" if v["spec"] else "(base settings)", v) for v in r["variants"]]
    for name, settings, s in runs:
        lines.append("| " + " | ".join([
            name, settings, cell(s, lambda s: fmt_num(s["tokens_per_second"])),
            cell(s, lambda s: f"{s['tokens_per_second'] / base['tokens_per_second']:.3f}"),
            cell(s, lambda s: f"{s['step_ms']['median']:.1f}"),
            cell(s, lambda s: f"{s['optimizer_ms']['median']:.1f}"),
            cell(s, lambda s: fmt_gib(s["peak_memory_bytes"])),
            cell(s, lambda s: f"{s['loss_last']:.3f}")]) + " |")
    return lines


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git checkout)"


def gpu_name(rows: list[dict], backend: str) -> str:
    if backend != "cuda":
        return "cpu"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        if out.strip():
            return out.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    for r in rows:
        if r["torch"] and r["torch"].get("device"):
            return r["torch"]["device"]
    return "unknown GPU"


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def parse_variant(text: str) -> dict:
    """--variant NAME=KEY=VALUE,KEY=VALUE,...: upper-case KEYs (A-Z, 0-9, _) are environment
    variables, the others lmtrain config keys (--set KEY=VALUE). An empty list reruns the base."""
    name, eq, spec = text.partition("=")
    if not eq or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=KEY=VALUE[,KEY=VALUE...] with a NAME "
                                         "of letters, digits, '_', '.' and '-'")
    env, sets = {}, {}
    for item in spec.split(",") if spec else []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise argparse.ArgumentTypeError(f"{text!r}: {item!r} is not KEY=VALUE")
        if key in env or key in sets:
            raise argparse.ArgumentTypeError(f"{text!r}: {key} is given twice")
        (env if re.fullmatch(r"[A-Z0-9_]+", key) else sets)[key] = value
    return {"name": name, "spec": spec, "env": env, "set": sets}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--lmtrain", default=os.path.join(REPO, "build", "lmtrain"), help="the built binary")
    p.add_argument("--quick", action="store_true", help="d12 only")
    p.add_argument("--configs", default="d12,d20", help="comma-separated dDEPTH names")
    p.add_argument("--batches", default="128,96,64,48,32,24,16,12,8,4", help="device batches to try, in order")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--warmup-steps", type=int, default=5, help="first steps excluded from the summary")
    p.add_argument("--data", default="data/tiny", help="token shards (both sides read the same)")
    p.add_argument("--tokenizer", default="data/tiny/tokenizer.json")
    p.add_argument("--out", default="bench-results", help="output directory (git-ignored)")
    p.add_argument("--budget-s", type=float, default=480,
                   help="wall-clock budget of the whole bench; runs that would start later are skipped")
    p.add_argument("--lmtrain-timeout", type=float, default=150, help="limit per lmtrain run (s)")
    p.add_argument("--torch-timeout", type=float, default=240,
                   help="limit per reference run (s), compilation included")
    p.add_argument("--backend", default="cuda", help="lmtrain run.backend (cpu only for testing this script)")
    p.add_argument("--torch-device", default="cuda", help="reference device (cpu only for testing)")
    p.add_argument("--torch-args", default="", help="extra torch_gpt.py arguments, e.g. '--attn hybrid'")
    p.add_argument("--python", default=sys.executable, help="interpreter for torch_gpt.py")
    p.add_argument("--skip-torch", action="store_true", help="run lmtrain only")
    p.add_argument("--no-profile", action="store_true",
                   help="skip the op-profile run (run.profile_steps) after the timed runs")
    p.add_argument("--profile-start", type=int, default=4, help="first profiled step of that run")
    p.add_argument("--profile-steps", type=int, default=4, help="profiled steps of that run")
    p.add_argument("--profile-top", type=int, default=15, help="ops listed per config in results.md")
    p.add_argument("--variant", dest="variants", metavar="NAME=SPEC", type=parse_variant,
                   action="append", default=[],
                   help="also time lmtrain at the base run's batch with SPEC, a comma-separated "
                        "KEY=VALUE list: environment variables (upper-case KEY) and config "
                        "overrides (e.g. run.recompute_activations=true); repeatable, run last")
    p.add_argument("--summarize-profile", metavar="OP_PROFILE_JSON",
                   help="only print the results.md summary of this op_profile.json and exit")
    a = p.parse_args(argv)
    names = ["d12"] if a.quick else [c.strip() for c in a.configs.split(",") if c.strip()]
    a.depths = []
    for n in names:
        m = re.fullmatch(r"d(\d+)", n)
        if not m or int(m.group(1)) < 1:
            p.error(f"--configs: {n!r} is not dDEPTH (e.g. d12)")
        a.depths.append(int(m.group(1)))
    try:
        a.batches = [int(b) for b in a.batches.split(",")]
    except ValueError:
        p.error(f"--batches: {a.batches!r} is not a comma-separated list of integers")
    if not a.batches or any(b < 1 for b in a.batches):
        p.error("--batches: need positive integers")
    if a.profile_start < 1 or a.profile_steps < 1 or a.profile_top < 1:
        p.error("--profile-start, --profile-steps and --profile-top must be >= 1")
    if a.steps - a.warmup_steps < 2 or a.warmup_steps < 0:
        p.error(f"--steps {a.steps} with --warmup-steps {a.warmup_steps} leaves fewer than 2 timed steps")
    names = [v["name"] for v in a.variants]
    for n in names:
        if names.count(n) > 1:
            p.error(f"--variant: the name {n!r} is used more than once")
    a.out = os.path.abspath(a.out)
    a.lmtrain = os.path.abspath(a.lmtrain)
    return a


def preflight(a) -> None:
    if not os.path.isfile(a.lmtrain) or not os.access(a.lmtrain, os.X_OK):
        raise Prerequisite(f"{a.lmtrain}: no lmtrain binary; build it first (make build) or carry "
                           "a prebuilt build/ directory to this machine")
    data = os.path.join(REPO, a.data) if not os.path.isabs(a.data) else a.data
    if os.path.isdir(data) and not glob.glob(os.path.join(data, "train_*.bin")):
        raise Prerequisite(f"{a.data}: no train_*.bin shards (make data, or carry data/tiny)")
    if not os.path.exists(data):
        raise Prerequisite(f"{a.data}: not found (make data, or carry data/tiny)")
    tok = os.path.join(REPO, a.tokenizer) if not os.path.isabs(a.tokenizer) else a.tokenizer
    if not os.path.isfile(tok):
        raise Prerequisite(f"{a.tokenizer}: not found (make data, or carry data/tiny)")
    if not a.skip_torch:
        probe = ("import torch, sys; ok = torch.cuda.is_available() if sys.argv[1] == 'cuda' else True; "
                 "print(torch.__version__, ok); sys.exit(0 if ok else 1)")
        r = subprocess.run([a.python, "-c", probe, a.torch_device], capture_output=True, text=True)
        if r.returncode != 0:
            raise Prerequisite(f"{a.python}: torch is missing or sees no {a.torch_device} device "
                               f"({(r.stdout + r.stderr).strip().splitlines()[-1:] or ['no output']})"
                               "; use --skip-torch to run lmtrain alone")


def summarize_file(path: str, top: int) -> int:
    try:
        with open(path) as f:
            summary = summarize_op_profile(json.load(f), top)
    except (OSError, json.JSONDecodeError, BadProfile) as e:
        print(f"bench: error: {path}: {e}", file=sys.stderr)
        return 2
    print("\n".join(render_profile_markdown(os.path.basename(os.path.dirname(os.path.abspath(path)))
                                           or path, summary)))
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.summarize_profile:
        return summarize_file(a.summarize_profile, a.profile_top)
    try:
        preflight(a)
    except Prerequisite as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.join(a.out, "logs"), exist_ok=True)
    start = time.monotonic()
    deadline = start + a.budget_s
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"bench: configs {['d%d' % d for d in a.depths]}, T={a.seq_len}, {a.steps} steps "
          f"({a.warmup_steps} warmup), budget {a.budget_s:.0f} s, results in {a.out}", flush=True)
    rows = [bench_config(a, d, deadline) for d in a.depths]
    meta = {"date": date, "gpu": gpu_name(rows, a.backend), "commit": git_commit(),
            "seconds": round(time.monotonic() - start, 1),
            "settings": {"seq_len": a.seq_len, "head_dim": a.head_dim, "aspect_ratio": a.aspect_ratio,
                         "steps": a.steps, "warmup_steps": a.warmup_steps, "batches": a.batches,
                         "data": a.data, "grad_accum": 1, "dtype": "bf16", "backend": a.backend,
                         "torch_device": a.torch_device, "torch_args": a.torch_args,
                         "lmtrain": a.lmtrain,
                         "profile": None if a.no_profile else {"start": a.profile_start,
                                                               "steps": a.profile_steps}}}
    md = render_markdown(meta, rows)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=2)
        f.write("\n")
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(md)
    print("\n" + md, flush=True)
    print(f"bench: {meta['seconds']:.0f} s; wrote {os.path.join(a.out, 'results.md')} and results.json")
    ok = all(r["lmtrain"] and r["lmtrain"].get("status") == "ok" and
             (a.skip_torch or (r["torch"] and r["torch"].get("status") == "ok")) and
             all((s or {}).get("status") not in ("failed", "timeout")
                 for s in [r["profile"], *r.get("variants", [])]) for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
