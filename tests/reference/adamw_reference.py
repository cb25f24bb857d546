"""Reference AdamW with nanochat-style parameter groups and LR schedule.

torch.optim.AdamW(foreach=False, fused=False) is the reference update rule
(decoupled weight decay p *= 1 - lr*wd, then the bias-corrected Adam step).
`adamw_step_explicit` spells the same math out so the C++ implementer has a
readable formula, and make_golden.py checks the two agree.
"""

from __future__ import annotations

import math

import torch

from gpt_reference import GPTConfig

GROUP_NAMES = ("embedding", "value_embeds", "unembedding", "resid", "x0", "matrix")


def group_of(name: str) -> str:
    """Which optimizer group a parameter belongs to."""
    if name == "transformer.wte.weight":
        return "embedding"
    if name.startswith("value_embeds."):
        return "value_embeds"
    if name == "lm_head.weight":
        return "unembedding"
    if name == "resid_lambdas":
        return "resid"
    if name == "x0_lambdas":
        return "x0"
    if name.startswith("transformer.h."):
        return "matrix"  # every parameter inside the blocks is 2-D
    raise KeyError(name)


def group_hparams(cfg: GPTConfig, optim: dict, total_batch_tokens: int) -> dict[str, dict]:
    """Base lr / betas / eps / weight_decay for every group (before the schedule)."""
    # Embedding-like LRs were tuned at lr_reference_width and scale as 1/sqrt(width).
    width_scale = (cfg.width / optim["lr_reference_width"]) ** -0.5
    # All LRs scale as sqrt(batch) relative to the reference batch size.
    batch_scale = math.sqrt(total_batch_tokens / optim["lr_reference_batch"])
    base = {
        "embedding": optim["embedding_lr"] * width_scale,
        "value_embeds": optim["embedding_lr"] * width_scale,
        "unembedding": optim["unembedding_lr"] * width_scale,
        "matrix": optim["matrix_lr"],
        "resid": optim["scalar_lr"] * 0.01,
        "x0": optim["scalar_lr"],
    }
    default_betas = (optim["adam_beta1"], optim["adam_beta2"])
    out = {}
    for g in GROUP_NAMES:
        out[g] = {
            "lr": base[g] * batch_scale,
            # x0_lambdas use a longer first-moment memory.
            "betas": (0.96, 0.95) if g == "x0" else default_betas,
            "eps": optim["adam_eps"],
            "weight_decay": optim["weight_decay"][g],
        }
    return out


def lr_multiplier(it: int, schedule: dict) -> float:
    """Linear warmup, flat, then linear warmdown to final_lr_frac (it is 0-based)."""
    n = schedule["num_iterations"]
    warmup = round(schedule["warmup_ratio"] * n)
    warmdown = round(schedule["warmdown_ratio"] * n)
    if it < warmup:
        return (it + 1) / warmup
    if it <= n - warmdown:
        return 1.0
    progress = (n - it) / warmdown
    return progress + (1.0 - progress) * schedule["final_lr_frac"]


def make_optimizer(params: dict[str, torch.Tensor], hparams: dict[str, dict]) -> torch.optim.AdamW:
    groups = []
    for g in GROUP_NAMES:
        members = [p for name, p in params.items() if group_of(name) == g]
        if not members:
            continue
        h = hparams[g]
        groups.append({
            "params": members,
            "name": g,
            "lr": h["lr"],
            "initial_lr": h["lr"],  # the schedule multiplies this each step
            "betas": h["betas"],
            "eps": h["eps"],
            "weight_decay": h["weight_decay"],
        })
    return torch.optim.AdamW(groups, foreach=False, fused=False)


def set_lr(opt: torch.optim.Optimizer, lrm: float) -> None:
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] * lrm


def adamw_step_explicit(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                        step: int, lr: float, beta1: float, beta2: float, eps: float,
                        wd: float) -> None:
    """One in-place AdamW step (step is 1-based), matching torch.optim.AdamW."""
    p.mul_(1.0 - lr * wd)
    m.lerp_(grad, 1.0 - beta1)                       # m = b1*m + (1-b1)*g
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)  # v = b2*v + (1-b2)*g^2
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    denom = v.sqrt() / math.sqrt(bc2) + eps
    p.addcdiv_(m, denom, value=-lr / bc1)
