#!/usr/bin/env python3
"""Regenerate the NorMuon / Muon-variant golden tensors.

Writes, under tests/golden/:
  normuon_stacks.json / .safetensors   3 Muon steps on three synthetic stacks,
                                       for every variant of the muon block
  normuon_gpt.json / .safetensors      4 training steps of the gpt_tiny model
                                       with each optim preset of configs/optim
                                       (the params after the last step; with
                                       cautious decay after every step)

Before writing anything it checks the reference itself:
  * Polar Express / Newton-Schulz singular values land in their design band,
  * NorMuon's second-moment step preserves each matrix's Frobenius norm,
  * the lerp momentum forms equal the explicit formulas, classic momentum too,
  * cautious weight decay's mask (X*p >= 0) has a float32-safe sign margin,
  * every float32 trajectory agrees with the same run in float64.

Usage: python3 tests/reference/make_golden_normuon.py   (deterministic, a few seconds)
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adamw_reference import lr_multiplier  # noqa: E402
from gpt_reference import GPTConfig, forward  # noqa: E402
from normuon_reference import (MUON_DEFAULTS, GPTOptimizer, MuonStack, deep_merge,  # noqa: E402
                               frobenius, load_preset, momentum_at, momentum_update,
                               orthogonalize, resolve_muon, resolve_optim,
                               second_moment_normalize, weight_decay_at)

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "golden")

# --------------------------------------------------------------------------
# The synthetic stacks golden
# --------------------------------------------------------------------------

STACKS = {"tall": (2, 48, 16), "wide": (2, 16, 48), "square": (3, 32, 32)}
STACK_STEPS = 3
STACK_LR = 0.02                     # lr_t before the schedule multiplier
STACK_LRM = [1.0, 1.0, 0.5]         # the schedule's multiplier at steps 0, 1, 2
STACK_DEPTH = 12
# Of seeds 0..119 this one gives the widest float32 sign margin of cautious
# weight decay's mask over all variants (5.6x the largest fp32 error of X;
# see sign_margin). Most seeds have some decision within 1-2x, since the
# variants make ~150k distinct decisions.
STACK_SEED = 59

# Every variant is NorMuon with a short momentum warmup (so mu changes over
# the 3 steps) and one switch flipped, as its name says.
BASE_VARIANT = deep_merge(MUON_DEFAULTS, {"momentum_warmup_steps": 2})


def stack_variants() -> dict[str, dict]:
    flips = {
        "normuon": {},
        "lerp_no_nesterov": {"nesterov": False},
        "classic_nesterov": {"momentum": "classic"},
        "classic_no_nesterov": {"momentum": "classic", "nesterov": False},
        "newton_schulz5": {"orthogonalizer": "newton_schulz5"},
        "ortho_none": {"orthogonalizer": "none"},
        "polar_express_3_steps": {"ortho_steps": 3},
        # An even count: the CUDA backend's iterations end in its other work buffer.
        "polar_express_4_steps": {"ortho_steps": 4},
        "polar_express_7_steps": {"ortho_steps": 7},
        "scale_moonshot": {"lr_scale": "moonshot"},
        "scale_sqrt_max": {"lr_scale": "sqrt_max"},
        "scale_none": {"lr_scale": "none"},
        "no_second_moment": {"second_moment": False},
        "beta2_0.9": {"beta2": 0.9},
        "wd_decoupled": {"weight_decay_mode": "decoupled"},
        "wd_none": {"weight_decay_mode": "none"},
        # The decay scaled from another reference depth (0.1 * (6 / 12)^1 at depth 12).
        "wd_depth_scaled": {"weight_decay_reference_depth": 6, "weight_decay_depth_exponent": 1.0},
        "overrides": {"param_overrides": [
            {"pattern": "square.*", "lr_mul": 0.5, "wd_mul": 2.0},
            {"pattern": "square.2", "lr_mul": 3.0, "wd_mul": 0.0},
        ]},
    }
    variants = {name: deep_merge(BASE_VARIANT, f) for name, f in flips.items()}
    for preset in ("muon-basic", "muon-moonshot"):
        muon = resolve_muon(load_preset(preset))
        variants[preset.replace("-", "_")] = deep_merge(muon, {"momentum_warmup_steps": 2})
    return variants


def stack_inputs(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for stack, shape in STACKS.items():
        out[f"{stack}.param0"] = torch.randn(shape, generator=gen) * 0.05
        for k in range(1, STACK_STEPS + 1):
            out[f"{stack}.grad{k}"] = torch.randn(shape, generator=gen) * 1e-2
    return out


def stack_names(stack: str) -> list[str]:
    return [f"{stack}.{k}" for k in range(STACKS[stack][0])]


def run_stacks(inputs: dict[str, torch.Tensor], muon: dict, dtype: torch.dtype):
    """3 steps of one variant on every stack.

    Returns ({name: tensor} of params/states, [decisions]) where a decision
    holds one stack's cautious-weight-decay inputs (see sign_margin).
    """
    out, decisions = {}, []
    for stack, (K, m, n) in STACKS.items():
        st = MuonStack(stack_names(stack), (m, n), muon, dtype)
        p = inputs[f"{stack}.param0"].to(dtype)
        for step in range(STACK_STEPS):
            g = inputs[f"{stack}.grad{step + 1}"].to(dtype)
            mu_t = momentum_at(step, muon)
            wd_t = weight_decay_at(step, muon, STACK_DEPTH, STACK_STEPS)
            p = st.step(p, g, STACK_LR * STACK_LRM[step], mu_t, wd_t)
            out[f"{stack}.param{step + 1}"] = p
            if muon["weight_decay_mode"] == "cautious":
                decisions.append({"step": step, "names": st.names, **st.last})
        out[f"{stack}.momentum_buffer"] = st.momentum_buffer
        if st.second_moment is not None:
            out[f"{stack}.second_moment"] = st.second_moment
    return out, decisions


# --------------------------------------------------------------------------
# The GPT golden
# --------------------------------------------------------------------------

GPT_PRESETS = ("normuon", "adamw", "muon-basic", "muon-moonshot")


def gpt_overrides(tiny_optim: dict) -> dict:
    """The optim keys written next to "preset" in the GPT golden configs.

    gpt_tiny's own optim section, minus the two keys the presets are about
    (matrix_lr and weight_decay.matrix, which would otherwise override every
    preset's choice) and gradient clipping (gpt_tiny's AdamW golden covers it),
    plus a 2-step momentum warmup so the schedule moves.
    """
    over = {k: v for k, v in tiny_optim.items() if k not in ("matrix_lr", "grad_clip")}
    over["weight_decay"] = {k: v for k, v in tiny_optim["weight_decay"].items() if k != "matrix"}
    over["muon"] = {"momentum_warmup_steps": 2}
    return over


def train_gpt(cfg: GPTConfig, init: dict[str, torch.Tensor], tokens: torch.Tensor,
              targets: torch.Tensor, optim: dict, total_batch_tokens: int, sched: dict,
              dtype: torch.dtype):
    """num_iterations steps on one batch. Returns (losses, the params after each step,
    decisions)."""
    params = {k: v.to(dtype).clone().requires_grad_(True) for k, v in init.items()}
    opt = GPTOptimizer(cfg, params, optim, total_batch_tokens, sched)
    losses, snapshots, decisions = [], [], []
    cautious = opt.stacks and opt.muon["weight_decay_mode"] == "cautious"
    for step in range(sched["num_iterations"]):
        opt.zero_grad()
        _, loss = forward(cfg, params, tokens, targets)
        loss.backward()
        losses.append(loss.detach().clone())
        opt.step(step)
        snapshots.append({k: v.detach().clone() for k, v in params.items()})
        if cautious:
            decisions += [{"step": step, "names": st.names, **st.last} for st in opt.stacks]
    return losses, snapshots, decisions


# --------------------------------------------------------------------------
# Self-checks
# --------------------------------------------------------------------------

SV_SHAPES = [(48, 16), (16, 48), (32, 32), (2, 32), (32, 2), (64, 64), (128, 32),
             (32, 128), (96, 384), (384, 96), (256, 256), (100, 300)]
# Random Gaussian matrices, and matrices with a prescribed log-spaced spectrum
# down to SV_MIN_RATIO of the largest singular value. Square Gaussian matrices
# alone are not enough: their smallest singular value is often ~1e-4 of the
# largest, below the range 5 quintic steps can lift (any orthogonalizer with a
# fixed number of odd-polynomial steps maps tiny singular values to tiny ones).
SV_MIN_RATIO = 1e-2
# Asserted bands (the measured ones, printed, are tighter).
SV_BOUNDS = {("polar_express", 5): (0.7, 1.2), ("newton_schulz5", 5): (0.6, 1.25)}


def spectrum_matrices(m: int, n: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """float64 (count, m, n) with singular values log-spaced from 1 to SV_MIN_RATIO (x0.01)."""
    r = min(m, n)
    Q1, _ = torch.linalg.qr(torch.randn(count, m, r, generator=gen, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(count, n, r, generator=gen, dtype=torch.float64))
    S = torch.logspace(0.0, math.log10(SV_MIN_RATIO), r, dtype=torch.float64)
    return (Q1 * S) @ Q2.mT * 0.01


def check_singular_value_bands() -> dict:
    gen = torch.Generator().manual_seed(11)
    bands = {}
    for kind, steps in [("polar_express", 5), ("newton_schulz5", 5),
                        ("polar_express", 3), ("polar_express", 7)]:
        for dtype in (torch.float64, torch.float32):
            lo, hi = math.inf, -math.inf
            for m, n in SV_SHAPES:
                # 0.01: gradient-like scale, so the normalisation epsilons matter as in use.
                u = torch.cat([torch.randn(8, m, n, generator=gen, dtype=torch.float64) * 0.01,
                               spectrum_matrices(m, n, 8, gen)])
                if m == n:  # see SV_SHAPES: keep only the prescribed spectra
                    u = u[8:]
                s = torch.linalg.svdvals(orthogonalize(u.to(dtype), kind, steps).double())
                lo, hi = min(lo, s.min().item()), max(hi, s.max().item())
            bands[f"{kind}_{steps}_{str(dtype).removeprefix('torch.')}"] = (lo, hi)
        if (kind, steps) in SV_BOUNDS:
            blo, bhi = SV_BOUNDS[(kind, steps)]
            for dt in ("float64", "float32"):
                lo, hi = bands[f"{kind}_{steps}_{dt}"]
                assert blo <= lo and hi <= bhi, f"{kind} {steps} {dt}: band [{lo}, {hi}]"
    print("self-check: orthogonalizer singular-value bands (min, max) over "
          f"{len(SV_SHAPES)} shapes, Gaussian + spectra down to {SV_MIN_RATIO:g}:")
    for key, (lo, hi) in bands.items():
        print(f"    {key:28s} [{lo:.4f}, {hi:.4f}]")
    return bands


def check_second_moment_preserves_norm() -> None:
    gen = torch.Generator().manual_seed(12)
    worst = 0.0
    for m, n in [(48, 16), (16, 48), (32, 32), (2, 32)]:
        X = orthogonalize(torch.randn(3, m, n, generator=gen), "polar_express", 5)
        state = torch.zeros((3, m, 1) if m >= n else (3, 1, n))
        for _ in range(3):  # also with a non-trivial EMA state
            Y = second_moment_normalize(X, state, 0.95)
            rel = ((frobenius(Y) - frobenius(X)).abs() / frobenius(X)).max().item()
            worst = max(worst, rel)
            X = X + 0.3 * torch.randn(X.shape, generator=gen) / math.sqrt(n)
    assert worst < 1e-5, worst
    print(f"self-check: second moment preserves ||X||_F (worst relative change {worst:.1e})")


def check_momentum_formulas() -> None:
    gen = torch.Generator().manual_seed(13)
    g = [torch.randn(4, 5, generator=gen, dtype=torch.float64) for _ in range(4)]
    mus = [0.85, 0.9, 0.95, 0.95]
    for kind in ("lerp", "classic"):
        for nesterov in (True, False):
            buf = torch.zeros(4, 5, dtype=torch.float64)
            ref = torch.zeros(4, 5, dtype=torch.float64)
            for gk, mu in zip(g, mus):
                u = momentum_update(buf, gk, mu, kind, nesterov)
                if kind == "lerp":      # explicit EMA and Nesterov lookahead
                    ref = mu * ref + (1 - mu) * gk
                    ref_u = (1 - mu) * gk + mu * ref if nesterov else ref
                else:                   # heavy ball: buf = mu*buf + g, u = g + mu*buf
                    ref = mu * ref + gk
                    ref_u = gk + mu * ref if nesterov else ref
                torch.testing.assert_close(buf, ref, rtol=1e-12, atol=1e-14)
                torch.testing.assert_close(u, ref_u, rtol=1e-12, atol=1e-14)
    print("self-check: lerp and classic momentum (with/without Nesterov) match the explicit formulas")


def sign_margin(dec32: list[dict], dec64: list[dict],
                at_risk_below: float = 3.0) -> tuple[float, list[dict]]:
    """How safely float32 decides cautious weight decay's mask (X*p >= 0).

    The mask is discontinuous: where rounding could decide the sign of X*p,
    the decay term jumps by lr_eff*w*|p|, far beyond any tolerance. Only the
    sign of X can be that fragile: X is a long chain of matmuls with an
    absolute error (~eps*||X||), while p carries a relative error, and a p so
    small that its sign is uncertain decays by a negligible lr_eff*w*|p|
    either way. So the margin of a decision that matters (w > 0, p != 0) is
    the float64 |X| over the largest float32-vs-float64 difference of X in
    that stack and step.

    Returns (smallest margin, decisions with margin < at_risk_below as dicts
    {step, param, index (flat), margin, jump = lr_eff*w*|p|}).
    """
    worst, at_risk = math.inf, []
    for d32, d64 in zip(dec32, dec64):
        X32, X64, p64 = d32["X"], d64["X"], d64["p"]
        err = max((X32.double() - X64).abs().max().item(), 1e-300)
        matters = (d64["w"] != 0).expand_as(X64) & (p64 != 0)
        margin = torch.where(matters, X64.abs() / err, torch.full_like(X64, math.inf))
        worst = min(worst, margin.min().item())
        jump = d64["lr_eff"] * d64["w"] * p64.abs()
        for k, i, j in (margin < at_risk_below).nonzero().tolist():
            at_risk.append({"step": d64["step"], "param": d64["names"][k],
                            "index": i * X64.size(-1) + j, "margin": round(margin[k, i, j].item(), 3),
                            "jump": float(f"{jump[k, i, j].item():.4g}")})
    return worst, at_risk


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (a per-tensor relative error)."""
    return (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-30)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def make_stacks_golden() -> None:
    inputs = stack_inputs(STACK_SEED)
    tensors = {k: v.clone() for k, v in inputs.items()}
    variants = stack_variants()
    worst_rel, worst_margin = 0.0, math.inf
    for name, muon in variants.items():
        out32, dec32 = run_stacks(inputs, muon, torch.float32)
        out64, dec64 = run_stacks(inputs, muon, torch.float64)
        for key, t in out32.items():
            worst_rel = max(worst_rel, rel_diff(t, out64[key]))
            tensors[f"{name}.{key}"] = t.clone()
        if dec32:
            worst_margin = min(worst_margin, sign_margin(dec32, dec64)[0])
    assert worst_rel < 1e-5, worst_rel
    assert worst_margin > 4.0, f"fragile cautious-WD sign (margin {worst_margin:.1f}); re-seed"
    print(f"self-check: stacks, {len(variants)} variants: fp32 vs fp64 max relative diff "
          f"{worst_rel:.1e}; cautious-WD sign margin {worst_margin:.0f}x the fp32 error")

    doc = {
        "schedule": {"num_iterations": STACK_STEPS, "lrm": STACK_LRM},
        "lr": STACK_LR,
        "depth": STACK_DEPTH,
        "seed": STACK_SEED,
        "stacks": {s: list(shape) for s, shape in STACKS.items()},
        "param_names": {s: stack_names(s) for s in STACKS},
        "variants": variants,
        "note": ("step k (1-based) uses grad{k}, lr = lr * lrm[k-1], momentum and weight "
                 "decay from the schedules at 0-based step k-1; param{k} is the stack after it"),
    }
    write(doc, tensors, "normuon_stacks")


def make_gpt_golden() -> None:
    with open(os.path.join(GOLDEN_DIR, "gpt_tiny.json")) as f:
        tiny = json.load(f)
    data = load_file(os.path.join(GOLDEN_DIR, "gpt_tiny.safetensors"))
    cfg = GPTConfig.from_dict(tiny["model"])
    tokens, targets = data["tokens"].long(), data["targets"].long()
    init = {k.removeprefix("param."): v for k, v in data.items() if k.startswith("param.")}
    sched, tbt = tiny["schedule"], tiny["batch"]["total_batch_tokens"]
    overrides = gpt_overrides(tiny["optim"])

    tensors, presets_doc = {}, {}
    for preset in GPT_PRESETS:
        section = {"preset": preset, **overrides}
        optim = resolve_optim(section)
        losses32, steps32, dec32 = train_gpt(cfg, init, tokens, targets, optim, tbt, sched, torch.float32)
        losses64, steps64, dec64 = train_gpt(cfg, init, tokens, targets, optim, tbt, sched, torch.float64)
        final32, final64 = steps32[-1], steps64[-1]
        loss_diff = max(abs(a.item() - b.item()) / abs(b.item()) for a, b in zip(losses32, losses64))
        margin, at_risk = sign_margin(dec32, dec64) if dec32 else (math.inf, [])
        # Outside the at-risk cautious decisions the fp32 run must track fp64
        # closely; an at-risk element may differ by its decay jumps (x1.5 for
        # the knock-on effect through later gradients).
        param_diff = 0.0
        for name in final32:
            slack = torch.zeros(final64[name].numel(), dtype=torch.float64)
            for d in at_risk:
                if d["param"] == name:
                    slack[d["index"]] += 1.5 * d["jump"]
            diff = (final32[name].double() - final64[name]).abs().flatten()
            scale = final64[name].abs().max().item()
            param_diff = max(param_diff, ((diff - slack).clamp_min(0) / scale).max().item())
        flips = sum(int(((d32["X"] * d32["p"] >= 0) != (d64["X"] * d64["p"] >= 0)).sum())
                    for d32, d64 in zip(dec32, dec64))
        print(f"self-check: gpt {preset:13s}: fp32 vs fp64 loss rel diff {loss_diff:.1e}, "
              f"final param max relative diff {param_diff:.1e}"
              + (f"; cautious-WD: min margin {margin:.2f}x, {len(at_risk)} decisions "
                 f"under 3x, {flips} flipped in fp32" if dec32 else ""))
        assert loss_diff < 1e-5 and param_diff < 2e-5, (preset, loss_diff, param_diff)
        for k, loss in enumerate(losses32, start=1):
            tensors[f"{preset}.step{k}.loss"] = loss.reshape(1)
        # With cautious decay, the params after every step: the C++ test restarts each step from
        # them, so that a decision rounding flips moves its own element at its own step only
        # (a flip's knock-on through later gradients and orthogonalizations has no bound).
        for k, snapshot in enumerate(steps32, start=1):
            if k == len(steps32) or dec32:
                for name, t in snapshot.items():
                    tensors[f"{preset}.step{k}.{name}"] = t
        presets_doc[preset] = {
            "optim": section,
            "resolved_optim": optim,
            "lrm": [lr_multiplier(s, sched) for s in range(sched["num_iterations"])],
            "losses": [x.item() for x in losses32],
        }
        if dec32:
            presets_doc[preset]["cautious_at_risk"] = at_risk
    doc = {
        "model": tiny["model"], "batch": tiny["batch"], "schedule": sched,
        "inputs": "tokens, targets and initial params param.* of gpt_tiny.safetensors",
        "presets": presets_doc,
    }
    write(doc, tensors, "normuon_gpt")


def write(doc: dict, tensors: dict[str, torch.Tensor], stem: str) -> None:
    with open(os.path.join(GOLDEN_DIR, f"{stem}.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    path = os.path.join(GOLDEN_DIR, f"{stem}.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, path,
              metadata={"generator": "tests/reference/make_golden_normuon.py"})
    print(f"wrote {path} ({os.path.getsize(path)} bytes, {len(tensors)} tensors)")


def main() -> None:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # fixed reduction order => bit-identical reruns
    check_singular_value_bands()
    check_second_moment_preserves_norm()
    check_momentum_formulas()
    make_stacks_golden()
    make_gpt_golden()


if __name__ == "__main__":
    main()
