#!/usr/bin/env python3
"""Fast PyTorch reference of the lmtrain GPT and its NorMuon + AdamW optimizer, for benchmarks.

The model and optimizer are those of tests/reference/gpt_reference.py and normuon_reference.py
(nanochat, late January 2026), written for speed the way nanochat runs them:

  * fp32 master weights, forward/backward under torch.autocast(bfloat16); the residual stream
    stays fp32 (embeddings and the lambdas are fp32, block outputs are added to it).
  * attention: torch.nn.attention.flex_attention, compiled as part of the model, with one causal
    sliding-window BlockMask per distinct window (query i sees keys i-window..i; S = T/2, L = T).
    --attn hybrid sends the layers whose window covers T to
    F.scaled_dot_product_attention(is_causal=True) instead (PyTorch's flash / cuDNN kernels).
    q, k, v are cast to the autocast dtype and the call runs with autocast off, so flex sees
    one dtype (mixed q/k fp32 and v bf16 breaks its compiled backward, pytorch#176025).
  * torch.compile on the whole model (dynamic=False); --compile none runs eagerly.
  * the block matrices: NorMuon stacked by shape in one compiled function per shape (nanochat's
    muon_step_fused): lerp Nesterov momentum, Polar Express in bf16, NorMuon second moment,
    cautious weight decay; hyperparameters enter as 0-D CPU tensors so nothing recompiles.
  * everything else: torch.optim.AdamW(fused=True) with lmtrain's groups, LRs and betas.

Data: the same token shards lmtrain reads (llm.c layout, docs/FORMATS.md), memory-mapped with
numpy and walked like lmtrain's `contiguous` packing for one rank: each micro-batch is B*T+1
consecutive tokens of a shard, the next starts B*T later, a shard tail too short for a batch is
skipped. Shards are visited in file order (lmtrain shuffles the order per epoch, which is the
same order when there is one shard, as in data/tiny). --data random draws uniform random tokens
from a fixed torch generator instead.

Timing: every step is bracketed by torch.cuda.synchronize() and CUDA events (the step, and the
optimizer step inside it); the first --warmup-steps steps (compilation, autotuning, allocator
growth) are excluded from the summary. Output: one JSON object on stdout (and --json-out).

Exit codes: 0 ok; 3 out of GPU memory (the JSON says status "oom"); 2 bad arguments or
inputs; anything else is an unexpected failure with a traceback.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field

# Set before torch initialises CUDA: fewer fragmentation OOMs (nanochat sets the same).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import numpy as np  # noqa: E402
# The model's shape and parameter table, the FLOPs count, the parameter groups, the preset merge
# and the Polar Express coefficients are the reference's own definitions.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "reference"))
from adamw_reference import group_of, lr_multiplier  # noqa: E402
from gpt_reference import VE_GATE_CHANNELS, GPTConfig, flops_per_token  # noqa: E402
from normuon_reference import POLAR_EXPRESS_COEFFS, deep_merge  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
EXIT_BAD_INPUT = 2
EXIT_OOM = 3

RMS_EPS = torch.finfo(torch.float32).eps
SHARD_MAGIC = 20240520
SHARD_HEADER_INTS = 256

# Dense bf16 tensor-core peaks, the table of src/backend/cuda/device.cpp (first match wins).
PEAK_FLOPS = [("H200 NVL", 835e12), ("H200", 989e12), ("H100 PCIe", 756e12),
              ("H100 NVL", 835e12), ("H100", 989e12), ("H800 PCIe", 756e12), ("H800", 989e12),
              ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12), ("4090", 165e12)]


class InputError(Exception):
    """A bad argument, config or data file: reported as one line, exit code 2."""


# --------------------------------------------------------------------------
# Configuration: the model shape and the optimizer settings of an lmtrain config
# --------------------------------------------------------------------------

class ModelShape(GPTConfig):
    """The reference's model shape, checked as a benchmark input."""

    def validate(self) -> None:
        if self.depth < 1 or self.head_dim < 2 or self.head_dim % 2 or self.sequence_len < 2:
            raise InputError(f"bad model shape {self}")
        if self.n_head % self.kv_heads:
            raise InputError(f"model.n_kv_head: {self.kv_heads} does not divide n_head {self.n_head}")
        if self.width < VE_GATE_CHANNELS:
            raise InputError(f"model: width {self.width} is below {VE_GATE_CHANNELS}")
        try:
            for i in range(self.depth):
                self.window(i)
        except ValueError as e:
            raise InputError(f"model.window_pattern: {e} (expected S or L)") from None


# Defaults of src/config/config.h (OptimConfig, MuonConfig, ScheduleConfig).
OPTIM_DEFAULTS: dict = {
    "matrix_optimizer": "normuon", "embedding_lr": 0.3, "unembedding_lr": 0.004,
    "matrix_lr": 0.02, "scalar_lr": 0.5, "adam_beta1": 0.8, "adam_beta2": 0.95,
    "adam_eps": 1e-10, "lr_reference_width": 768, "lr_reference_batch": 524288,
    "grad_clip": 0.0,
    "weight_decay": {"embedding": 0.0, "value_embeds": 0.0, "unembedding": 0.0, "resid": 0.0,
                     "x0": 0.0, "matrix": 0.0},
    "muon": {
        "momentum": "lerp", "nesterov": True, "momentum_start": 0.85, "momentum_end": 0.95,
        "momentum_warmup_steps": 300, "orthogonalizer": "polar_express", "ortho_steps": 5,
        "lr_scale": "rectangular", "second_moment": True, "beta2": 0.95,
        "weight_decay_mode": "cautious", "weight_decay": 0.1,
        "weight_decay_reference_depth": 12, "weight_decay_depth_exponent": 2.0,
        "param_overrides": [],
    },
}
SCHEDULE_DEFAULTS: dict = {"warmup_ratio": 0.0, "warmdown_ratio": 0.2, "final_lr_frac": 0.0}

# What this fast implementation covers; anything else is rejected, not approximated.
SUPPORTED_MUON = {"momentum": "lerp", "nesterov": True, "orthogonalizer": "polar_express",
                  "lr_scale": "rectangular", "second_moment": True,
                  "weight_decay_mode": "cautious", "param_overrides": []}


def load_optim_schedule(path: str) -> tuple[dict, dict]:
    """The optim and schedule sections of an lmtrain config, with its preset and the defaults."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: {e}") from None
    section = dict(doc.get("optim", {}))
    preset = section.pop("preset", "")
    if preset:
        preset_path = os.path.join(REPO, "configs", "optim", f"{preset}.json")
        try:
            with open(preset_path) as f:
                section = deep_merge(json.load(f), section)
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: optim.preset {preset!r}: {e}") from None
    optim = deep_merge(OPTIM_DEFAULTS, section)
    unknown = set(optim) - set(OPTIM_DEFAULTS) | set(optim["muon"]) - set(OPTIM_DEFAULTS["muon"])
    if unknown:
        raise InputError(f"{path}: unknown optim keys {sorted(unknown)}")
    if optim["matrix_optimizer"] != "normuon":
        raise InputError(f"{path}: optim.matrix_optimizer {optim['matrix_optimizer']!r}: "
                         "this benchmark reference implements normuon only")
    for key, want in SUPPORTED_MUON.items():
        if optim["muon"][key] != want:
            raise InputError(f"{path}: optim.muon.{key} = {optim['muon'][key]!r}: this benchmark "
                             f"reference implements only {want!r}")
    schedule = deep_merge(SCHEDULE_DEFAULTS, {k: v for k, v in doc.get("schedule", {}).items()
                                              if k in SCHEDULE_DEFAULTS})
    return optim, schedule


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------

def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=RMS_EPS)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d = x.size(-1) // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, m: ModelShape, layer: int, attn_kind: str):
        super().__init__()
        C, D, H, Hkv = m.width, m.head_dim, m.n_head, m.kv_heads
        self.H, self.Hkv, self.D = H, Hkv, D
        self.window = m.window(layer)
        # Full-window layers go to SDPA's causal kernels only in hybrid mode.
        self.use_sdpa = attn_kind == "hybrid" and self.window >= m.sequence_len
        self.c_q = nn.Linear(C, H * D, bias=False)
        self.c_k = nn.Linear(C, Hkv * D, bias=False)
        self.c_v = nn.Linear(C, Hkv * D, bias=False)
        self.c_proj = nn.Linear(H * D, C, bias=False)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, Hkv, bias=False) if m.has_value_embeds(layer) else None

    def forward(self, xn, ve, cos, sin, block_mask):
        B, T, _ = xn.shape
        q = self.c_q(xn).view(B, T, self.H, self.D)
        k = self.c_k(xn).view(B, T, self.Hkv, self.D)
        v = self.c_v(xn).view(B, T, self.Hkv, self.D)
        dt = q.dtype  # the autocast dtype (bf16), or fp32 without autocast
        if self.ve_gate is not None:
            gate = 2.0 * torch.sigmoid(self.ve_gate(xn[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.Hkv, self.D)
        q = norm(apply_rotary(q, cos, sin)).to(dt).transpose(1, 2)
        k = norm(apply_rotary(k, cos, sin)).to(dt).transpose(1, 2)
        v = v.to(dt).transpose(1, 2)
        gqa = self.Hkv != self.H
        with torch.autocast(device_type=xn.device.type, enabled=False):
            if self.use_sdpa:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            elif isinstance(block_mask, torch.Tensor):  # --attn masked: explicit (T, T) bool mask
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=block_mask, enable_gqa=gqa)
            else:
                y = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.H * self.D)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.c_fc = nn.Linear(C, 4 * C, bias=False)
        self.c_proj = nn.Linear(4 * C, C, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, m: ModelShape, layer: int, attn_kind: str):
        super().__init__()
        self.attn = Attention(m, layer, attn_kind)
        self.mlp = MLP(m.width)

    def forward(self, x, ve, cos, sin, block_mask):
        x = x + self.attn(norm(x), ve, cos, sin, block_mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, m: ModelShape, attn_kind: str):
        super().__init__()
        self.m = m
        C, Vp = m.width, m.padded_vocab
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(Vp, C),
            "h": nn.ModuleList([Block(m, i, attn_kind) for i in range(m.depth)]),
        })
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(Vp, m.kv_heads * m.head_dim)
                                           for i in range(m.depth) if m.has_value_embeds(i)})
        self.resid_lambdas = nn.Parameter(torch.ones(m.depth))
        self.x0_lambdas = nn.Parameter(torch.full((m.depth,), 0.1))
        self.lm_head = nn.Linear(C, Vp, bias=False)
        inv_freq = 1.0 / (m.rope_base ** (torch.arange(0, m.head_dim, 2, dtype=torch.float32) / m.head_dim))
        freqs = torch.outer(torch.arange(m.sequence_len, dtype=torch.float32), inv_freq)
        # (1, T, 1, D/2): broadcasts over batch and heads of (B, T, heads, D/2).
        self.register_buffer("cos", freqs.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", freqs.sin()[None, :, None, :], persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """gpt_reference.init_weights' distributions (not its random stream)."""
        gen = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        s = math.sqrt(3.0 / self.m.width)
        for name, p in self.named_parameters():
            if name == "transformer.wte.weight":
                p.normal_(0.0, 1.0, generator=gen)
            elif name == "lm_head.weight":
                p.normal_(0.0, 0.001, generator=gen)
            elif name.endswith(("c_proj.weight", "ve_gate.weight")):
                p.zero_()
            elif name.endswith(("c_q.weight", "c_k.weight", "c_v.weight", "c_fc.weight")) \
                    or name.startswith("value_embeds."):
                p.uniform_(-s, s, generator=gen)
            elif name == "resid_lambdas":
                p.fill_(1.0)
            elif name == "x0_lambdas":
                p.fill_(0.1)
            else:
                raise KeyError(name)

    def forward(self, idx, targets, block_masks):
        """Mean cross-entropy; block_masks: one BlockMask (or None) per layer."""
        m = self.m
        B, T = idx.shape
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.transformer.wte(idx))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if m.has_value_embeds(i) else None
            x = block(x, ve, cos, sin, block_masks[i])
        x = norm(x)
        logits = self.lm_head(x)[..., :m.vocab_size]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32
        logits = m.softcap * torch.tanh(logits / m.softcap)
        return F.cross_entropy(logits.reshape(-1, m.vocab_size), targets.reshape(-1), ignore_index=-1)


def sliding_causal(window: int):
    """flex mask_mod: query q_idx sees keys q_idx - window .. q_idx."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)
    return mask_mod


def make_block_masks(m: ModelShape, device: torch.device, attn_kind: str) -> tuple:
    """Per layer: a causal sliding-window BlockMask (one object per distinct window), None for
    the layers hybrid mode sends to SDPA, or a (T, T) bool mask in masked mode."""
    T = m.sequence_len
    cache: dict[int, object] = {}
    masks = []
    for i in range(m.depth):
        w = m.window(i)
        if attn_kind == "hybrid" and w >= T:
            masks.append(None)
            continue
        if attn_kind == "masked":
            if w not in cache:
                qi = torch.arange(T, device=device)[:, None]
                kj = torch.arange(T, device=device)[None, :]
                cache[w] = (kj <= qi) & (kj >= qi - w)
        elif w not in cache:
            cache[w] = create_block_mask(sliding_causal(w), None, None, T, T, device=str(device))
        masks.append(cache[w])
    return tuple(masks)


# --------------------------------------------------------------------------
# Optimizer: NorMuon (stacked, compiled) for the block matrices, fused AdamW for the rest
# --------------------------------------------------------------------------

def muon_step(grads, params, momentum_buffer, second_moment, momentum_t, lr_t, wd_t, beta2_t,
              ns_steps: int, red_dim: int, ortho_dtype: torch.dtype) -> None:
    """One NorMuon update of a stack (K, m, n), in place on params and the state (nanochat's
    muon_step_fused; the spec is normuon_reference.MuonStack.step)."""
    mu = momentum_t.to(grads.dtype)
    momentum_buffer.lerp_(grads, 1 - mu)
    g = grads.lerp_(momentum_buffer, mu)  # Nesterov: lerp(g, buf, mu)
    # Polar Express (in bf16 by default, as nanochat).
    X = g.to(ortho_dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    if g.size(-2) > g.size(-1):  # tall: the same iteration on X^T, written without transposes
        for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
            A = X.mT @ X
            B = b * A + c * (A @ A)
            X = a * X + X @ B
    else:
        for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
            A = X @ X.mT
            B = b * A + c * (A @ A)
            X = a * X + B @ X
    g = X.to(params.dtype)
    # NorMuon second moment along the longer side, keeping each matrix's Frobenius norm.
    beta2 = beta2_t.to(g.dtype)
    v_mean = g.square().mean(dim=red_dim, keepdim=True)
    red_size = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_size).sqrt()
    second_moment.lerp_(v_mean, 1 - beta2)
    step_size = second_moment.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * red_size) * step_size.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10)))
    # Cautious weight decay (only where update and weight agree in sign) and the step.
    lr = lr_t.to(g.dtype)
    wd = wd_t.to(g.dtype)
    mask = (g * params >= 0).to(g.dtype)
    params.sub_(lr * g + lr * wd * params * mask)


@dataclass
class MuonStack:
    names: list[str]
    params: list[torch.Tensor]
    momentum: torch.Tensor
    second_moment: torch.Tensor
    lr_scale: float
    red_dim: int
    lr_t: torch.Tensor = field(default_factory=lambda: torch.tensor(0.0))


class MuonAdamW:
    def __init__(self, model: GPT, optim: dict, batch_tokens: int, num_iterations: int,
                 schedule: dict, compile_muon: bool, ortho_dtype: torch.dtype):
        m = model.m
        self.m, self.optim, self.schedule, self.n = m, optim, schedule, num_iterations
        self.muon = optim["muon"]
        self.parameters = list(model.parameters())
        width_scale = (m.width / optim["lr_reference_width"]) ** -0.5
        batch_scale = math.sqrt(batch_tokens / optim["lr_reference_batch"])
        base = {"embedding": optim["embedding_lr"] * width_scale,
                "value_embeds": optim["embedding_lr"] * width_scale,
                "unembedding": optim["unembedding_lr"] * width_scale,
                "matrix": optim["matrix_lr"],
                "resid": optim["scalar_lr"] * 0.01,
                "x0": optim["scalar_lr"]}
        self.lrs = {g: lr * batch_scale for g, lr in base.items()}
        named = dict(model.named_parameters())
        groups = []
        for g in ("embedding", "value_embeds", "unembedding", "resid", "x0"):
            members = [p for n, p in named.items() if group_of(n) == g]
            if not members:
                continue
            betas = (0.96, 0.95) if g == "x0" else (optim["adam_beta1"], optim["adam_beta2"])
            groups.append({"params": members, "name": g, "lr": self.lrs[g], "initial_lr": self.lrs[g],
                           "betas": betas, "eps": optim["adam_eps"],
                           "weight_decay": optim["weight_decay"][g]})
        self.adamw = torch.optim.AdamW(groups, fused=True)
        by_shape: dict[tuple, list[str]] = {}
        for n, p in named.items():
            if group_of(n) == "matrix":
                by_shape.setdefault(tuple(p.shape), []).append(n)
        self.stacks = []
        for (rows, cols), names in by_shape.items():
            K = len(names)
            p0 = named[names[0]]
            red_dim = -1 if rows >= cols else -2
            sm_shape = (K, rows, 1) if red_dim == -1 else (K, 1, cols)
            self.stacks.append(MuonStack(
                names=names, params=[named[n] for n in names],
                momentum=torch.zeros(K, rows, cols, dtype=p0.dtype, device=p0.device),
                second_moment=torch.zeros(sm_shape, dtype=p0.dtype, device=p0.device),
                lr_scale=math.sqrt(max(1.0, rows / cols)), red_dim=red_dim))
        # 0-D CPU tensors: their values change every step without recompiling muon_step (the
        # compiled kernels take them as scalars). Eager mode keeps them on the parameters' device.
        sdev = torch.device("cpu") if compile_muon else model.lm_head.weight.device
        self.momentum_t = torch.tensor(0.0, device=sdev)
        self.wd_t = torch.tensor(0.0, device=sdev)
        self.beta2_t = torch.tensor(float(self.muon["beta2"]), device=sdev)
        for st in self.stacks:
            st.lr_t = torch.tensor(0.0, device=sdev)
        self.ortho_dtype = ortho_dtype
        self.muon_fn = (torch.compile(muon_step, dynamic=False, fullgraph=True)
                        if compile_muon else muon_step)

    def momentum_at(self, step: int) -> float:
        mu = self.muon
        w = mu["momentum_warmup_steps"]
        frac = min(step / w, 1.0) if w > 0 else 1.0
        return (1.0 - frac) * mu["momentum_start"] + frac * mu["momentum_end"]

    def weight_decay_at(self, step: int) -> float:
        mu = self.muon
        depth_scale = (mu["weight_decay_reference_depth"] / self.m.depth) ** mu["weight_decay_depth_exponent"]
        return mu["weight_decay"] * depth_scale * (1.0 - step / self.n)

    @torch.no_grad()
    def step(self, step: int) -> None:
        """One update (step 0-based) from every parameter's .grad."""
        if self.optim["grad_clip"] > 0:
            # lmtrain clips by the global norm too (it scales by clip / norm; torch adds 1e-6).
            torch.nn.utils.clip_grad_norm_(self.parameters, self.optim["grad_clip"])
        lrm = lr_multiplier(step, {**self.schedule, "num_iterations": self.n})
        for group in self.adamw.param_groups:
            group["lr"] = group["initial_lr"] * lrm
        self.adamw.step()
        self.momentum_t.fill_(self.momentum_at(step))
        self.wd_t.fill_(self.weight_decay_at(step))
        lr = self.lrs["matrix"] * lrm
        for st in self.stacks:
            st.lr_t.fill_(lr * st.lr_scale)
            grads = torch.stack([p.grad for p in st.params])
            params = torch.stack(st.params)
            self.muon_fn(grads, params, st.momentum, st.second_moment, self.momentum_t, st.lr_t,
                         self.wd_t, self.beta2_t, self.muon["ortho_steps"], st.red_dim,
                         self.ortho_dtype)
            torch._foreach_copy_(st.params, list(params.unbind(0)))

    def zero_grad(self) -> None:
        for group in self.adamw.param_groups:
            for p in group["params"]:
                p.grad = None
        for st in self.stacks:
            for p in st.params:
                p.grad = None


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------

def read_vocab_size(tokenizer_path: str) -> int:
    """lmtrain's Tokenizer::vocab_size: the largest id in model.vocab and added_tokens, + 1."""
    try:
        with open(tokenizer_path) as f:
            tok = json.load(f)
        ids = list(tok["model"]["vocab"].values()) + [t["id"] for t in tok.get("added_tokens") or []]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{tokenizer_path}: cannot read the vocabulary: {e}") from None
    if not ids:
        raise InputError(f"{tokenizer_path}: empty vocabulary")
    return max(ids) + 1


def open_shard(path: str) -> np.ndarray:
    """Memory-maps the tokens of one shard after checking its header (docs/FORMATS.md)."""
    size = os.path.getsize(path)
    if size < SHARD_HEADER_INTS * 4:
        raise InputError(f"{path}: shorter than the {SHARD_HEADER_INTS * 4}-byte header")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise InputError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC})")
    if header[1] not in (1, 2):
        raise InputError(f"{path}: unknown version {header[1]}")
    dtype = np.dtype("<u2") if header[1] == 1 else np.dtype("<u4")
    count = int(header[2])
    if size - SHARD_HEADER_INTS * 4 != count * dtype.itemsize:
        raise InputError(f"{path}: header says {count} tokens but the file holds "
                         f"{size - SHARD_HEADER_INTS * 4} bytes after the header")
    return np.memmap(path, dtype=dtype, mode="r", offset=SHARD_HEADER_INTS * 4, shape=(count,))


class ShardBatches:
    """lmtrain's contiguous packing for rank 0 of 1, shards in file order."""

    def __init__(self, data: str, B: int, T: int, vocab: int):
        if os.path.isdir(data):
            paths = sorted(glob.glob(os.path.join(data, "train_*.bin")))
        else:
            paths = [data]
        if not paths or not all(os.path.isfile(p) for p in paths):
            raise InputError(f"{data}: no train_*.bin shards (run `make data`, or carry data/tiny)")
        self.shards = [open_shard(p) for p in paths]
        self.paths = paths
        need = B * T + 1
        if max(len(s) for s in self.shards) < need:
            raise InputError(f"{data}: a batch of B={B} T={T} needs {need} tokens in one shard; "
                             f"the largest holds {max(len(s) for s in self.shards)}")
        for p, s in zip(paths, self.shards):
            top = int(s.max()) if len(s) else 0
            if top >= vocab:
                raise InputError(f"{p}: token id {top} is outside the vocabulary of {vocab}")
        self.B, self.T = B, T
        self.shard, self.pos = 0, 0

    def next(self) -> torch.Tensor:
        """(B*T+1,) int64 tokens on the host, pinned when CUDA is available."""
        n = self.B * self.T + 1
        while self.pos + n > len(self.shards[self.shard]):
            self.shard = (self.shard + 1) % len(self.shards)
            self.pos = 0
        chunk = torch.from_numpy(self.shards[self.shard][self.pos:self.pos + n].astype(np.int64))
        self.pos += self.B * self.T
        return chunk


class RandomBatches:
    def __init__(self, B: int, T: int, vocab: int, seed: int):
        self.B, self.T, self.vocab = B, T, vocab
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        return torch.randint(0, self.vocab, (self.B * self.T + 1,), generator=self.gen)


# --------------------------------------------------------------------------
# Benchmark loop
# --------------------------------------------------------------------------

def peak_flops_for(name: str) -> float | None:
    for key, flops in PEAK_FLOPS:
        if key in name:
            return flops
    return None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--depth", type=int, required=True)
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--n-kv-head", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--window-pattern", default="SSSL")
    p.add_argument("--device-batch", type=int, required=True, help="sequences per micro-step (B)")
    p.add_argument("--total-batch-tokens", type=int, default=-1,
                   help="tokens per optimizer step (-1: B*T, one micro-step)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps (the schedule horizon)")
    p.add_argument("--warmup-steps", type=int, default=5, help="first steps left out of the summary")
    p.add_argument("--data", default=os.path.join(REPO, "data", "tiny"),
                   help="a shard, a directory of train_*.bin, or 'random'")
    p.add_argument("--vocab-size", type=int, default=0,
                   help="0: from --tokenizer (as lmtrain's model.vocab_size=0)")
    p.add_argument("--tokenizer", default=os.path.join(REPO, "data", "tiny", "tokenizer.json"))
    p.add_argument("--optim-config", default=os.path.join(REPO, "scripts", "bench", "lmtrain_bench.json"),
                   help="lmtrain config whose optim and schedule sections (and preset) are used")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="autocast dtype (fp32: no autocast); Polar Express follows --ortho-dtype")
    p.add_argument("--ortho-dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--attn", choices=["flex", "hybrid", "masked"], default="flex",
                   help="flex: flex_attention in every layer; hybrid: SDPA is_causal where the "
                        "window covers T, flex elsewhere; masked: SDPA with an explicit (T, T) "
                        "mask in every layer (slow; for CPU checks, flex has no CPU backward)")
    p.add_argument("--compile", choices=["model", "none"], default="model",
                   help="torch.compile the model and the Muon step, or run eagerly")
    p.add_argument("--peak-flops", type=float, default=0.0,
                   help="dense bf16 peak FLOP/s for MFU (0: from the GPU name, lmtrain's table)")
    p.add_argument("--json-out", default="", help="also write the result JSON here")
    p.add_argument("--quiet", action="store_true", help="no per-step lines on stderr")
    a = p.parse_args(argv)
    if a.depth < 1 or a.device_batch < 1 or a.seq_len < 2:
        p.error("--depth, --device-batch and --seq-len must be positive (seq-len >= 2)")
    if a.steps < 1 or a.warmup_steps < 0:
        p.error("--steps must be >= 1 and --warmup-steps >= 0")
    if a.steps - a.warmup_steps < 2:
        p.error(f"--steps {a.steps} leaves {a.steps - a.warmup_steps} timed steps after "
                f"--warmup-steps {a.warmup_steps}; need at least 2")
    micro = a.device_batch * a.seq_len
    if a.total_batch_tokens == -1:
        a.total_batch_tokens = micro
    if a.total_batch_tokens < micro or a.total_batch_tokens % micro:
        p.error(f"--total-batch-tokens {a.total_batch_tokens} is not a positive multiple of "
                f"device_batch x seq_len = {micro}")
    return a


def summarize(values: list[float]) -> dict:
    v = sorted(values)
    n = len(v)
    return {"mean": sum(v) / n, "median": v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2]),
            "min": v[0], "max": v[-1]}


def run(a: argparse.Namespace) -> dict:
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise InputError("--device cuda but torch.cuda.is_available() is False")
    if a.data != "random" and not os.path.exists(a.data):
        raise InputError(f"--data {a.data}: not found (run `make data`, or carry data/tiny)")
    vocab = a.vocab_size or read_vocab_size(a.tokenizer)
    m = ModelShape(depth=a.depth, vocab_size=vocab, aspect_ratio=a.aspect_ratio, head_dim=a.head_dim,
                   n_kv_head=a.n_kv_head, sequence_len=a.seq_len, window_pattern=a.window_pattern)
    m.validate()
    optim, schedule = load_optim_schedule(a.optim_config)
    B, T = a.device_batch, a.seq_len
    grad_accum = a.total_batch_tokens // (B * T)
    torch.manual_seed(a.seed)
    torch.set_float32_matmul_precision("high")
    autocast_dtype = torch.bfloat16 if a.dtype == "bf16" else None
    ortho_dtype = torch.bfloat16 if a.ortho_dtype == "bf16" else torch.float32

    loader = (RandomBatches(B, T, vocab, a.seed) if a.data == "random"
              else ShardBatches(a.data, B, T, vocab))
    with torch.device(device):
        model = GPT(m, a.attn)
    model.init_weights(a.seed)
    masks = make_block_masks(m, device, a.attn)
    fwd = torch.compile(model, dynamic=False) if a.compile == "model" else model
    opt = MuonAdamW(model, optim, a.total_batch_tokens, a.steps, schedule,
                    compile_muon=a.compile == "model", ortho_dtype=ortho_dtype)
    gpu_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = a.peak_flops or (peak_flops_for(gpu_name) if cuda else None)
    fpt = flops_per_token(m)
    n_params = sum(p.numel() for p in model.parameters())
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    steps = []
    for step in range(a.steps):
        sync()
        t0 = time.perf_counter()
        if cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
        loss_sum = torch.zeros((), device=device)
        for _ in range(grad_accum):
            chunk = loader.next()
            if cuda:
                chunk = chunk.pin_memory().to(device, non_blocking=True)
            else:
                chunk = chunk.to(device)
            x = chunk[:-1].view(B, T)
            y = chunk[1:].view(B, T)
            with torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                loss = fwd(x, y, masks)
            (loss / grad_accum).backward()
            loss_sum += loss.detach()
        if cuda:
            ev[1].record()
        else:
            t_opt = time.perf_counter()
        opt.step(step)
        opt.zero_grad()
        if cuda:
            ev[2].record()
        sync()
        wall = time.perf_counter() - t0
        if cuda:
            step_ms, opt_ms = ev[0].elapsed_time(ev[2]), ev[1].elapsed_time(ev[2])
        else:
            step_ms, opt_ms = 1e3 * wall, 1e3 * (time.perf_counter() - t_opt)
        train_loss = loss_sum.item() / grad_accum
        if not math.isfinite(train_loss):
            raise RuntimeError(f"step {step + 1}: loss is {train_loss}; stopping")
        steps.append({"step": step + 1, "train_loss": train_loss, "step_ms": step_ms,
                      "optimizer_ms": opt_ms, "wall_ms": 1e3 * wall})
        if not a.quiet:
            print(f"step {step + 1}/{a.steps} | loss {train_loss:.4f} | {step_ms:.1f} ms "
                  f"(optimizer {opt_ms:.1f} ms)", file=sys.stderr, flush=True)

    timed = steps[a.warmup_steps:]
    step_ms = summarize([s["step_ms"] for s in timed])
    opt_ms = summarize([s["optimizer_ms"] for s in timed])
    # Tokens over total time of the timed steps (not a mean of per-step rates).
    tps = a.total_batch_tokens * len(timed) / (sum(s["step_ms"] for s in timed) / 1e3)
    return {
        "status": "ok",
        "implementation": "torch",
        "torch_version": torch.__version__,
        "device": gpu_name,
        "model": {"depth": m.depth, "width": m.width, "n_head": m.n_head, "n_kv_head": m.kv_heads,
                  "head_dim": m.head_dim, "sequence_len": T, "vocab_size": vocab,
                  "padded_vocab": m.padded_vocab, "windows": [m.window(i) for i in range(m.depth)],
                  "parameters": n_params},
        "settings": {"device_batch": B, "total_batch_tokens": a.total_batch_tokens,
                     "grad_accum": grad_accum, "steps": a.steps, "warmup_steps": a.warmup_steps,
                     "timed_steps": len(timed), "dtype": a.dtype, "ortho_dtype": a.ortho_dtype,
                     "attn": a.attn, "compile": a.compile,
                     "data": a.data if a.data == "random" else getattr(loader, "paths", a.data),
                     "seed": a.seed},
        "flops_per_token": fpt,
        "peak_flops": peak,
        "tokens_per_second": tps,
        "mfu": fpt * tps / peak if peak else None,
        "step_ms": step_ms,
        "optimizer_ms": opt_ms,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "peak_memory_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else None,
        "loss_first": steps[0]["train_loss"],
        "loss_last": steps[-1]["train_loss"],
        "steps": steps,
    }


def emit(result: dict, json_out: str) -> None:
    text = json.dumps(result, indent=2)
    if json_out:
        os.makedirs(os.path.dirname(os.path.abspath(json_out)), exist_ok=True)
        with open(json_out, "w") as f:
            f.write(text + "\n")
    print(text)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        result = run(a)
    except InputError as e:
        print(f"torch_gpt.py: error: {e}", file=sys.stderr)
        emit({"status": "error", "error": str(e)}, a.json_out)
        return EXIT_BAD_INPUT
    except torch.cuda.OutOfMemoryError as e:
        first = str(e).splitlines()[0] if str(e) else "CUDA out of memory"
        print(f"torch_gpt.py: out of memory at device_batch {a.device_batch}: {first}", file=sys.stderr)
        emit({"status": "oom", "error": first, "device_batch": a.device_batch}, a.json_out)
        return EXIT_OOM
    except Exception as e:  # noqa: BLE001 - report everything else, with the traceback
        traceback.print_exc()
        # Inductor sometimes wraps an OOM raised while autotuning or compiling.
        if "out of memory" in str(e).lower():
            emit({"status": "oom", "error": str(e).splitlines()[0]}, a.json_out)
            return EXIT_OOM
        emit({"status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"},
             a.json_out)
        return 1
    emit(result, a.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
