"""Reference NorMuon optimizer and its Muon variants (CPU, fp32 or fp64).

Written from the lmtrain optimizer specification, not from the C++ sources.
Every variant the C++ exposes as a config switch lives in the `muon` block of
the optim section; `MUON_DEFAULTS` is NorMuon itself.

The update for one stack of equal-shaped matrices (K, m, n), m = rows:
  1. momentum         ("lerp" | "classic", optionally Nesterov)
  2. orthogonalize    ("polar_express" | "newton_schulz5" | "none")
  3. second moment    (NorMuon's per-row / per-column normalisation, optional)
  4. lr shape scale   ("rectangular" | "moonshot" | "sqrt_max" | "none")
  5. weight decay     ("cautious" | "decoupled" | "none") and the step
All functions are dtype-agnostic so the same code runs in float64 for the
conditioning checks in make_golden_normuon.py.

Non-Muon parameters (wte, value_embeds, lm_head, the scalar lambdas) use
AdamW exactly as adamw_reference.py sets it up.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import os

import torch

from adamw_reference import group_hparams, group_of, lr_multiplier, make_optimizer, set_lr
from gpt_reference import GPTConfig

PRESETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                           "configs", "optim")

# NorMuon: the defaults of every key of the `muon` block.
MUON_DEFAULTS: dict = {
    "momentum": "lerp",
    "nesterov": True,
    "momentum_start": 0.85,
    "momentum_end": 0.95,
    "momentum_warmup_steps": 300,
    "orthogonalizer": "polar_express",
    "ortho_steps": 5,
    "lr_scale": "rectangular",
    "second_moment": True,
    "beta2": 0.95,
    "weight_decay_mode": "cautious",
    "weight_decay": 0.1,
    "weight_decay_reference_depth": 12,
    "weight_decay_depth_exponent": 2.0,
    "param_overrides": [],
}

# Polar Express: one (a, b, c) per iteration; past the fifth the last repeats.
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
# The quintic Newton-Schulz iteration of the original Muon: one fixed triple.
NEWTON_SCHULZ5_COEFFS = (3.4445, -4.7750, 2.0315)

SECOND_MOMENT_FLOOR = 1e-10
NORM_FLOOR = 1e-10


# --------------------------------------------------------------------------
# Config: presets and defaults
# --------------------------------------------------------------------------

def deep_merge(base: dict, override: dict) -> dict:
    """Recursive dict merge; keys of `override` win. Lists are replaced, not merged."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_preset(name: str, presets_dir: str = PRESETS_DIR) -> dict:
    with open(os.path.join(presets_dir, f"{name}.json")) as f:
        return json.load(f)


def resolve_optim(section: dict, presets_dir: str = PRESETS_DIR) -> dict:
    """Apply {"preset": name, ...}: the preset file is the base, explicit keys win."""
    section = dict(section)
    preset = section.pop("preset", None)
    if preset is None:
        return copy.deepcopy(section)
    return deep_merge(load_preset(preset, presets_dir), section)


def resolve_muon(optim: dict) -> dict:
    """The full muon block: NorMuon defaults under whatever the optim section sets."""
    return deep_merge(MUON_DEFAULTS, optim.get("muon", {}))


# --------------------------------------------------------------------------
# Schedules and per-parameter multipliers
# --------------------------------------------------------------------------

def momentum_at(step: int, muon: dict) -> float:
    """Linear warmup of the momentum from momentum_start to momentum_end (step 0-based)."""
    warmup = muon["momentum_warmup_steps"]
    frac = min(step / warmup, 1.0) if warmup > 0 else 1.0
    return (1.0 - frac) * muon["momentum_start"] + frac * muon["momentum_end"]


def weight_decay_at(step: int, muon: dict, depth: int, num_iterations: int) -> float:
    """Weight decay scaled to the model depth, decaying linearly to 0 over training."""
    depth_scale = (muon["weight_decay_reference_depth"] / depth) ** muon["weight_decay_depth_exponent"]
    return muon["weight_decay"] * depth_scale * (1.0 - step / num_iterations)


def param_multipliers(name: str, overrides: list[dict]) -> tuple[float, float]:
    """(lr_mul, wd_mul) of a parameter: the LAST matching glob wins; default (1, 1)."""
    lr_mul, wd_mul = 1.0, 1.0
    for entry in overrides:
        if fnmatch.fnmatchcase(name, entry["pattern"]):
            lr_mul = entry.get("lr_mul", 1.0)
            wd_mul = entry.get("wd_mul", 1.0)
    return lr_mul, wd_mul


def lr_shape_scale(m: int, n: int, mode: str) -> float:
    if mode == "rectangular":
        return math.sqrt(max(1.0, m / n))
    if mode == "moonshot":
        return 0.2 * math.sqrt(max(m, n))
    if mode == "sqrt_max":
        return math.sqrt(max(m, n))
    if mode == "none":
        return 1.0
    raise ValueError(f"unknown lr_scale {mode!r}")


# --------------------------------------------------------------------------
# The five stages of the update (all on stacks (K, m, n))
# --------------------------------------------------------------------------

def frobenius(x: torch.Tensor) -> torch.Tensor:
    """Per-matrix Frobenius norm of a stack, shape (K, 1, 1)."""
    return x.square().sum(dim=(-2, -1), keepdim=True).sqrt()


def momentum_update(buf: torch.Tensor, g: torch.Tensor, mu: float, kind: str,
                    nesterov: bool) -> torch.Tensor:
    """Updates `buf` in place and returns the direction u that gets orthogonalized."""
    if kind == "lerp":
        buf.lerp_(g, 1.0 - mu)                      # buf = mu*buf + (1-mu)*g
        return torch.lerp(g, buf, mu) if nesterov else buf.clone()  # g + mu*(buf-g)
    if kind == "classic":
        buf.mul_(mu).add_(g)                        # buf = mu*buf + g
        return g + mu * buf if nesterov else buf.clone()
    raise ValueError(f"unknown momentum {kind!r}")


def _iterate(X: torch.Tensor, coeffs: list[tuple[float, float, float]]) -> torch.Tensor:
    """X <- a X + (b A + c A A) X with A = X X^T, for each (a, b, c) in turn.

    Called with rows <= cols, so A is the smaller Gram matrix.
    """
    for a, b, c in coeffs:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X


def orthogonalize(u: torch.Tensor, kind: str, steps: int) -> torch.Tensor:
    """Approximate U V^T of every matrix of the stack (K, m, n)."""
    if kind == "none":
        return u.clone()
    tall = u.size(-2) > u.size(-1)
    X = u.mT if tall else u
    if kind == "polar_express":
        # The 1.02 safety factor keeps the top singular value inside the range
        # the first coefficient triple was optimised for despite rounding.
        X = X / (frobenius(X) * 1.02 + 1e-6)
        coeffs = [POLAR_EXPRESS_COEFFS[min(i, len(POLAR_EXPRESS_COEFFS) - 1)] for i in range(steps)]
    elif kind == "newton_schulz5":
        X = X / (frobenius(X) + 1e-7)
        coeffs = [NEWTON_SCHULZ5_COEFFS] * steps
    else:
        raise ValueError(f"unknown orthogonalizer {kind!r}")
    X = _iterate(X, coeffs)
    return (X.mT if tall else X).contiguous()


def second_moment_dim(m: int, n: int) -> int:
    """NorMuon normalises along the longer side: per row if m >= n, else per column."""
    return -1 if m >= n else -2


def second_moment_normalize(X: torch.Tensor, state: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon: divide by the RMS of each row (or column), keep each matrix's norm.

    `state` (K, m, 1) or (K, 1, n) is updated in place (EMA, no bias correction).
    """
    dim = second_moment_dim(X.size(-2), X.size(-1))
    v_mean = X.square().mean(dim=dim, keepdim=True)
    state.lerp_(v_mean, 1.0 - beta2)
    norm_before = frobenius(X)
    X = X * torch.rsqrt(state.clamp_min(SECOND_MOMENT_FLOOR))
    # Only the relative row/column scales change; the overall step size is
    # still that of the orthogonalized update.
    return X * (norm_before / frobenius(X).clamp_min(NORM_FLOOR))


def apply_update(p: torch.Tensor, X: torch.Tensor, lr_t: float, lr_eff: torch.Tensor,
                 w: torch.Tensor, mode: str) -> torch.Tensor:
    """Weight decay and the step. lr_eff, w: (K, 1, 1). Returns the new parameter."""
    if mode == "cautious":
        # Decay only where the update already pulls the weight toward zero.
        mask = (X * p >= 0).to(p.dtype)
        return p - lr_eff * X - lr_eff * w * p * mask
    if mode == "decoupled":
        # AdamW-style decay with the plain group LR (no shape scale, no lr_mul).
        return p * (1.0 - lr_t * w) - lr_eff * X
    if mode == "none":
        return p - lr_eff * X
    raise ValueError(f"unknown weight_decay_mode {mode!r}")


# --------------------------------------------------------------------------
# One stack
# --------------------------------------------------------------------------

class MuonStack:
    """K equal-shaped matrices updated together, with their optimizer state."""

    def __init__(self, names: list[str], shape: tuple[int, int], muon: dict,
                 dtype: torch.dtype = torch.float32):
        self.names = list(names)
        self.muon = muon
        K, (m, n) = len(names), shape
        self.shape = (m, n)
        self.momentum_buffer = torch.zeros(K, m, n, dtype=dtype)
        self.second_moment = None
        if muon["second_moment"]:
            sm_shape = (K, m, 1) if second_moment_dim(m, n) == -1 else (K, 1, n)
            self.second_moment = torch.zeros(sm_shape, dtype=dtype)
        mults = [param_multipliers(nm, muon["param_overrides"]) for nm in names]
        self.lr_mul = torch.tensor([a for a, _ in mults], dtype=dtype).view(K, 1, 1)
        self.wd_mul = torch.tensor([b for _, b in mults], dtype=dtype).view(K, 1, 1)
        # The last step's orthogonalized update X, incoming parameters p,
        # lr_eff and w, kept for the sign-margin check of cautious weight decay.
        self.last: dict[str, torch.Tensor] = {}

    def step(self, p: torch.Tensor, g: torch.Tensor, lr_t: float, mu_t: float,
             wd_t: float) -> torch.Tensor:
        """Returns the updated stack p (K, m, n); the state is updated in place."""
        mu = self.muon
        u = momentum_update(self.momentum_buffer, g, mu_t, mu["momentum"], mu["nesterov"])
        X = orthogonalize(u, mu["orthogonalizer"], mu["ortho_steps"])
        lr_eff = lr_t * lr_shape_scale(*self.shape, mu["lr_scale"]) * self.lr_mul
        w = wd_t * self.wd_mul
        self.last = {"X": X, "p": p, "lr_eff": lr_eff, "w": w}
        if self.second_moment is not None:
            X = second_moment_normalize(X, self.second_moment, mu["beta2"])
        return apply_update(p, X, lr_t, lr_eff, w, mu["weight_decay_mode"])


def stack_by_shape(names_shapes: list[tuple[str, tuple[int, ...]]]) -> dict[tuple[int, int], list[str]]:
    """Group 2-D parameter names by shape, keeping first-appearance order."""
    stacks: dict[tuple[int, int], list[str]] = {}
    for name, shape in names_shapes:
        stacks.setdefault(tuple(shape), []).append(name)
    return stacks


# --------------------------------------------------------------------------
# The full GPT optimizer: NorMuon (or AdamW) for the matrices, AdamW elsewhere
# --------------------------------------------------------------------------

class GPTOptimizer:
    """What lmtrain's trainer does for one resolved optim section.

    Muon parameters are exactly the adamw_reference "matrix" group (every
    parameter inside transformer.h, all 2-D).
    """

    def __init__(self, cfg: GPTConfig, params: dict[str, torch.Tensor], optim: dict,
                 total_batch_tokens: int, schedule: dict):
        self.cfg, self.params, self.schedule = cfg, params, schedule
        self.matrix_optimizer = optim.get("matrix_optimizer", "normuon")
        wd = dict(optim["weight_decay"])
        if self.matrix_optimizer != "adamw":
            # Unused when the matrices go to Muon; group_hparams wants the key.
            wd.setdefault("matrix", 0.0)
        self.hparams = group_hparams(cfg, {**optim, "weight_decay": wd}, total_batch_tokens)
        if self.matrix_optimizer == "adamw":
            self.adamw = make_optimizer(params, self.hparams)
            self.stacks = []
            return
        if self.matrix_optimizer != "normuon":
            raise ValueError(f"unknown matrix_optimizer {self.matrix_optimizer!r}")
        self.muon = resolve_muon(optim)
        adam_params = {k: v for k, v in params.items() if group_of(k) != "matrix"}
        self.adamw = make_optimizer(adam_params, self.hparams)
        matrices = [(k, tuple(v.shape)) for k, v in params.items() if group_of(k) == "matrix"]
        self.stacks = [MuonStack(names, shape, self.muon, next(iter(params.values())).dtype)
                       for shape, names in stack_by_shape(matrices).items()]

    def step(self, step: int) -> None:
        """One update (step 0-based) from the .grad of every parameter."""
        lrm = lr_multiplier(step, self.schedule)
        set_lr(self.adamw, lrm)
        self.adamw.step()
        if not self.stacks:
            return
        lr_t = self.hparams["matrix"]["lr"] * lrm
        mu_t = momentum_at(step, self.muon)
        wd_t = weight_decay_at(step, self.muon, self.cfg.depth, self.schedule["num_iterations"])
        with torch.no_grad():
            for st in self.stacks:
                p = torch.stack([self.params[k].detach() for k in st.names])
                g = torch.stack([self.params[k].grad for k in st.names])
                new = st.step(p, g, lr_t, mu_t, wd_t)
                for i, k in enumerate(st.names):
                    self.params[k].copy_(new[i])

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None
