"""Independent PyTorch reference of the lmtrain GPT model (CPU, fp32).

This file is written from the written model specification, not from the C++
sources, so that agreement between the two is meaningful. It is deliberately
plain: parameters live in a flat dict keyed by their nanochat state_dict name,
and the forward pass is a single function that spells every operation out
(attention included) instead of calling fused kernels.

The forward pass is dtype-agnostic (it never forces float32) so that the same
code can be run in float64 for finite-difference gradient checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The RMSNorm epsilon is part of the spec: float32 machine epsilon, passed
# explicitly so that it does not silently follow the input dtype (which is
# what F.rms_norm does when eps=None) during float64 checks.
RMS_EPS = torch.finfo(torch.float32).eps

# ve_gate looks at only the first VE_GATE_CHANNELS channels of the normed input.
VE_GATE_CHANNELS = 32


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

@dataclass
class GPTConfig:
    depth: int
    aspect_ratio: int = 64
    head_dim: int = 128
    n_kv_head: int = 0          # 0 means "same as n_head" (plain multi-head attention)
    sequence_len: int = 2048
    vocab_size: int = 32768
    window_pattern: str = "SSSL"
    softcap: float = 15.0
    rope_base: float = 10000.0

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        return cls(**d)

    @property
    def n_layer(self) -> int:
        return self.depth

    @property
    def width(self) -> int:
        # Round the width up to a whole number of heads.
        return math.ceil(self.depth * self.aspect_ratio / self.head_dim) * self.head_dim

    @property
    def n_head(self) -> int:
        return self.width // self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head > 0 else self.n_head

    @property
    def padded_vocab(self) -> int:
        # Embedding / unembedding tables are padded to a multiple of 64 rows.
        return math.ceil(self.vocab_size / 64) * 64

    def window(self, layer: int) -> int:
        """Attention window of a layer: 'L' = full T, 'S' = T//2; last layer always L."""
        T = self.sequence_len
        if layer == self.n_layer - 1:
            return T
        ch = self.window_pattern[layer % len(self.window_pattern)]
        if ch == "L":
            return T
        if ch == "S":
            return T // 2
        raise ValueError(f"bad window pattern character {ch!r}")

    def has_value_embeds(self, layer: int) -> bool:
        # Alternating layers, always including the last one.
        return layer % 2 == (self.n_layer - 1) % 2


# --------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------

def param_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name (nanochat state_dict key) and its shape, in a fixed order."""
    C, D = cfg.width, cfg.head_dim
    H, Hkv, Vp = cfg.n_head, cfg.kv_heads, cfg.padded_vocab
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (Vp, C)}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}"
        shapes[f"{p}.attn.c_q.weight"] = (H * D, C)
        shapes[f"{p}.attn.c_k.weight"] = (Hkv * D, C)
        shapes[f"{p}.attn.c_v.weight"] = (Hkv * D, C)
        shapes[f"{p}.attn.c_proj.weight"] = (C, H * D)
        if cfg.has_value_embeds(i):
            shapes[f"{p}.attn.ve_gate.weight"] = (Hkv, VE_GATE_CHANNELS)
        shapes[f"{p}.mlp.c_fc.weight"] = (4 * C, C)
        shapes[f"{p}.mlp.c_proj.weight"] = (C, 4 * C)
    for i in range(cfg.n_layer):
        if cfg.has_value_embeds(i):
            shapes[f"value_embeds.{i}.weight"] = (Vp, Hkv * D)
    shapes["resid_lambdas"] = (cfg.n_layer,)
    shapes["x0_lambdas"] = (cfg.n_layer,)
    shapes["lm_head.weight"] = (Vp, C)
    return shapes


def init_weights(cfg: GPTConfig, seed: int) -> dict[str, torch.Tensor]:
    """The real training initialisation (used only for the statistical init check)."""
    gen = torch.Generator().manual_seed(seed)
    C = cfg.width
    s = math.sqrt(3.0 / C)  # U(-s, s) has std 1/sqrt(C)
    params: dict[str, torch.Tensor] = {}
    for name, shape in param_shapes(cfg).items():
        t = torch.empty(shape, dtype=torch.float32)
        if name == "transformer.wte.weight":
            t.normal_(0.0, 1.0, generator=gen)
        elif name == "lm_head.weight":
            t.normal_(0.0, 0.001, generator=gen)
        elif name.endswith(("c_proj.weight", "ve_gate.weight")):
            # Output projections and gates start at zero so every block starts
            # as the identity on the residual stream.
            t.zero_()
        elif name.endswith(("c_q.weight", "c_k.weight", "c_v.weight", "c_fc.weight")) \
                or name.startswith("value_embeds."):
            t.uniform_(-s, s, generator=gen)
        elif name == "resid_lambdas":
            t.fill_(1.0)
        elif name == "x0_lambdas":
            t.fill_(0.1)
        else:
            raise KeyError(name)
        params[name] = t
    return params


def flops_per_token(cfg: GPTConfig) -> int:
    """6 * (matmul weights) + attention score/value FLOPs, nanochat convention."""
    excluded = ("transformer.wte.weight", "resid_lambdas", "x0_lambdas")
    matmul_numel = sum(
        math.prod(shape) for name, shape in param_shapes(cfg).items()
        if name not in excluded and not name.startswith("value_embeds.")
    )
    H, D, T = cfg.n_head, cfg.head_dim, cfg.sequence_len
    attn = sum(12 * H * D * min(cfg.window(i), T) for i in range(cfg.n_layer))
    return 6 * matmul_numel + attn


# --------------------------------------------------------------------------
# Forward pass
# --------------------------------------------------------------------------

def norm(x: torch.Tensor) -> torch.Tensor:
    """Weightless RMSNorm over the last dimension."""
    return F.rms_norm(x, (x.size(-1),), eps=RMS_EPS)


def rotary_cos_sin(T: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (T, head_dim/2), always computed in float32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    t = torch.arange(T, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE on x of shape (B, T, heads, D)."""
    d = x.size(-1) // 2
    # (T, d) -> (1, T, 1, d) to broadcast over batch and heads.
    cos = cos[None, :, None, :].to(x.dtype)
    sin = sin[None, :, None, :].to(x.dtype)
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = -x1 * sin + x2 * cos
    return torch.cat([y1, y2], dim=-1)


def window_mask(T: int, window: int) -> torch.Tensor:
    """(T, T) bool, True where query i may attend key j: i - window <= j <= i."""
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    return (j <= i) & (j >= i - window)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Explicit sliding-window causal attention with GQA.

    q: (B, H, T, D); k, v: (B, Hkv, T, D). Returns (B, H, T, D).
    """
    H, T, D = q.size(1), q.size(2), q.size(3)
    group = H // k.size(1)
    # repeat_interleave maps query head h to kv head h // group.
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))
    scores = scores.masked_fill(~window_mask(T, window), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return probs @ v


def attention_block(cfg: GPTConfig, params: dict[str, torch.Tensor], layer: int,
                    xn: torch.Tensor, idx: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    B, T, _ = xn.shape
    H, Hkv, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    p = f"transformer.h.{layer}.attn"
    q = F.linear(xn, params[f"{p}.c_q.weight"]).view(B, T, H, D)
    k = F.linear(xn, params[f"{p}.c_k.weight"]).view(B, T, Hkv, D)
    v = F.linear(xn, params[f"{p}.c_v.weight"]).view(B, T, Hkv, D)
    if cfg.has_value_embeds(layer):
        ve = F.embedding(idx, params[f"value_embeds.{layer}.weight"]).view(B, T, Hkv, D)
        gate = 2.0 * torch.sigmoid(F.linear(xn[..., :VE_GATE_CHANNELS], params[f"{p}.ve_gate.weight"]))
        v = v + gate.unsqueeze(-1) * ve
    q = norm(apply_rotary(q, cos, sin))
    k = norm(apply_rotary(k, cos, sin))
    # (B, T, heads, D) -> (B, heads, T, D) for the matmuls.
    y = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), cfg.window(layer))
    y = y.transpose(1, 2).reshape(B, T, H * D)
    return F.linear(y, params[f"{p}.c_proj.weight"])


def mlp_block(params: dict[str, torch.Tensor], layer: int, xn: torch.Tensor) -> torch.Tensor:
    p = f"transformer.h.{layer}.mlp"
    h = F.linear(xn, params[f"{p}.c_fc.weight"])
    h = F.relu(h).square()
    return F.linear(h, params[f"{p}.c_proj.weight"])


def forward(cfg: GPTConfig, params: dict[str, torch.Tensor], idx: torch.Tensor,
            targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (softcapped logits (B, T, V), mean cross-entropy loss or None)."""
    T = idx.size(1)
    V = cfg.vocab_size
    cos, sin = rotary_cos_sin(T, cfg.head_dim, cfg.rope_base)

    x = norm(F.embedding(idx, params["transformer.wte.weight"]))
    x0 = x
    resid = params["resid_lambdas"]
    x0_l = params["x0_lambdas"]
    for i in range(cfg.n_layer):
        x = resid[i] * x + x0_l[i] * x0
        x = x + attention_block(cfg, params, i, norm(x), idx, cos, sin)
        x = x + mlp_block(params, i, norm(x))
    x = norm(x)

    # Padded vocabulary rows are dropped before softcap and loss.
    logits = F.linear(x, params["lm_head.weight"])[..., :V]
    logits = cfg.softcap * torch.tanh(logits / cfg.softcap)
    if targets is None:
        return logits, None
    loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1),
                           ignore_index=-1, reduction="mean")
    return logits, loss
