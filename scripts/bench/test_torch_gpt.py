#!/usr/bin/env python3
"""CPU checks of the benchmark reference against the spec references in tests/reference.

  * the fast model (torch_gpt.GPT, eager, explicit-mask attention) computes the same loss and
    gradients as gpt_reference.forward, in float64, with and without grouped-query attention;
  * MuonAdamW (Polar Express in the parameters' dtype) makes the same updates as
    normuon_reference.GPTOptimizer over several steps, including LR warmdown;
  * flops_per_token agrees with gpt_reference.flops_per_token and with `lmtrain info` when a
    built binary is given (--lmtrain build/lmtrain);
  * the shard reader walks lmtrain's contiguous packing (offsets B*T apart, B*T+1 tokens);
  * with --lmtrain, a checkpoint lmtrain trained (10 steps, CPU) loads into the fast model with
    `safetensors.torch.load_file` and `load_state_dict`, as docs/FORMATS.md shows, and gives the
    loss `lmtrain eval` reports for the same validation windows.

Run: python3 scripts/bench/test_torch_gpt.py [--lmtrain build/lmtrain]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "reference"))

import torch_gpt as tg  # noqa: E402
import gpt_reference as ref  # noqa: E402
import normuon_reference as nref  # noqa: E402

FAILURES: list[str] = []


def check(cond: bool, what: str) -> None:
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        FAILURES.append(what)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_pair(depth: int, n_kv_head: int, seed: int, T: int = 32):
    shape = tg.ModelShape(depth=depth, vocab_size=100, aspect_ratio=16, head_dim=16,
                          n_kv_head=n_kv_head, sequence_len=T)
    shape.validate()
    cfg = ref.GPTConfig(depth=depth, aspect_ratio=16, head_dim=16, n_kv_head=n_kv_head,
                        sequence_len=T, vocab_size=100)
    model = tg.GPT(shape, "masked").double()
    model.init_weights(seed)
    with torch.no_grad():  # non-zero projections so every path carries gradient
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith(("c_proj.weight", "ve_gate.weight")):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    return shape, cfg, model


def test_model(depth: int, n_kv_head: int) -> None:
    shape, cfg, model = make_pair(depth, n_kv_head, seed=7)
    names = dict(model.named_parameters())
    check(set(names) == set(ref.param_shapes(cfg)) and
          all(tuple(p.shape) == ref.param_shapes(cfg)[n] for n, p in names.items()),
          f"depth {depth} kv {n_kv_head}: parameter names and shapes match gpt_reference")
    params = {n: p.detach().clone().requires_grad_(True) for n, p in names.items()}
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 100, (2, 32), generator=gen)
    tgt = torch.randint(0, 100, (2, 32), generator=gen)
    masks = tg.make_block_masks(shape, torch.device("cpu"), "masked")
    loss = model(idx, tgt, masks)
    loss.backward()
    _, loss_ref = ref.forward(cfg, params, idx, tgt)
    loss_ref.backward()
    check(abs(loss.item() - loss_ref.item()) < 1e-10,
          f"depth {depth} kv {n_kv_head}: loss {loss.item():.12f} == reference {loss_ref.item():.12f}")
    worst = max(rel(names[n].grad, params[n].grad) for n in names)
    check(worst < 1e-9, f"depth {depth} kv {n_kv_head}: gradients match (worst relative error {worst:.2e})")


def test_attention_kinds() -> None:
    """flex (the benchmark's kernel, its block masks) and hybrid agree with the explicit mask.

    Forward only: flex_attention has no CPU backward. Eager flex runs its unfused path, which
    still applies the mask_mod and BlockMask under test.
    """
    # T = 384: the S window (192) ends inside a 128-token block, so the BlockMask has full,
    # partial and empty blocks.
    T = 384
    for n_kv_head in (0, 1):
        shape, _, model = make_pair(4, n_kv_head, seed=13, T=T)
        gen = torch.Generator().manual_seed(4)
        idx = torch.randint(0, 100, (2, T), generator=gen)
        tgt = torch.randint(0, 100, (2, T), generator=gen)
        with torch.no_grad():
            want = model(idx, tgt, tg.make_block_masks(shape, torch.device("cpu"), "masked")).item()
            full = tg.ModelShape(**{**shape.__dict__, "window_pattern": "L"})
            causal = model(idx, tgt, tg.make_block_masks(full, torch.device("cpu"), "masked")).item()
            for kind in ("flex", "hybrid"):
                fast = tg.GPT(shape, kind).double()
                fast.load_state_dict(model.state_dict())
                got = fast(idx, tgt, tg.make_block_masks(shape, torch.device("cpu"), kind)).item()
                # Plain causal attention instead of the window must not pass.
                check(abs(got - want) < 1e-9 and abs(got - causal) > 1e-6,
                      f"attn {kind} kv {n_kv_head}: loss {got:.12f} == explicit mask {want:.12f}")


def test_optimizer() -> None:
    depth, steps = 3, 10
    shape, cfg, model = make_pair(depth, 0, seed=11)
    optim, schedule = tg.load_optim_schedule(os.path.join(HERE, "lmtrain_bench.json"))
    # Exercise the AdamW weight-decay path too (the bench config has none).
    optim = tg.deep_merge(optim, {"weight_decay": {"embedding": 0.01, "unembedding": 0.02}})
    batch_tokens = 2 * 32
    opt = tg.MuonAdamW(model, optim, batch_tokens, steps, schedule, compile_muon=False,
                       ortho_dtype=torch.float64)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    sched = dict(schedule, num_iterations=steps)
    ref_opt = nref.GPTOptimizer(cfg, params, optim, batch_tokens, sched)
    gen = torch.Generator().manual_seed(5)
    worst = 0.0
    for step in range(steps):
        for n, p in model.named_parameters():
            g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.grad = g.clone()
            params[n].grad = g.clone()
        opt.step(step)
        opt.zero_grad()
        ref_opt.step(step)
        ref_opt.zero_grad()
        worst = max(worst, max(rel(p.detach(), params[n]) for n, p in model.named_parameters()))
    moved = max(rel(p.detach(), tg_init) for (_, p), tg_init in
                zip(model.named_parameters(), make_pair(depth, 0, seed=11)[2].parameters()))
    check(moved > 1e-3, f"optimizer moved the parameters (relative change {moved:.2e})")
    check(worst < 1e-9, f"MuonAdamW == normuon_reference.GPTOptimizer over {steps} steps "
                        f"(worst relative parameter error {worst:.2e})")
    # Stacks: one per distinct matrix shape, as lmtrain and the reference stack them.
    shapes = sorted(tuple(st.params[0].shape) for st in opt.stacks)
    check(shapes == sorted(nref.stack_by_shape(
        [(n, tuple(s)) for n, s in ref.param_shapes(cfg).items() if n.startswith("transformer.h.")])),
        f"Muon stacks by shape: {shapes}")


def test_bf16_polar_express() -> None:
    """The bf16 Polar Express (the benchmark default) stays near the fp32 one."""
    gen = torch.Generator().manual_seed(9)
    for m, n in ((48, 48), (192, 48), (48, 192)):
        g = torch.randn(4, m, n, generator=gen)
        p0 = torch.randn(4, m, n, generator=gen)
        red = -1 if m >= n else -2
        deltas = []
        for dt in (torch.float32, torch.bfloat16):
            p = p0.clone()
            sm = torch.zeros((4, m, 1) if red == -1 else (4, 1, n))
            tg.muon_step(g.clone(), p, torch.zeros(4, m, n), sm, torch.tensor(0.9),
                         torch.tensor(0.02), torch.tensor(0.1), torch.tensor(0.95), 5, red, dt)
            deltas.append(p - p0)
        err = rel(deltas[1], deltas[0])
        # bf16 has an 8-bit significand; five iterations leave roughly 5-10% elementwise noise.
        check(err < 0.15, f"bf16 vs fp32 Polar Express update ({m}x{n}): relative difference {err:.3f}")


def test_flops(lmtrain: str | None) -> None:
    for depth in (2, 3, 12, 20):
        shape = tg.ModelShape(depth=depth, vocab_size=8192, head_dim=128, sequence_len=2048)
        cfg = ref.GPTConfig(depth=depth, head_dim=128, sequence_len=2048, vocab_size=8192)
        check(tg.flops_per_token(shape) == ref.flops_per_token(cfg),
              f"d{depth}: flops_per_token {tg.flops_per_token(shape):.6e} == gpt_reference")
        if lmtrain:
            out = subprocess.run(
                [lmtrain, "info", "--config", os.path.join(HERE, "lmtrain_bench.json"),
                 "--set", f"model.depth={depth}", "--set", "run.backend=cpu"],
                cwd=REPO, capture_output=True, text=True, check=True).stdout
            got = float(re.search(r"flops per token: ([0-9.e+]+)", out).group(1))
            check(abs(got / tg.flops_per_token(shape) - 1) < 1e-4,
                  f"d{depth}: lmtrain info says {got:.4e} flops per token")


def test_shards() -> None:
    data = os.path.join(REPO, "data", "tiny")
    if not os.path.isdir(data):
        print("skip shard test: data/tiny is missing")
        return
    vocab = tg.read_vocab_size(os.path.join(data, "tokenizer.json"))
    check(vocab == 8192, f"data/tiny vocabulary: {vocab}")
    B, T = 4, 16
    loader = tg.ShardBatches(data, B, T, vocab)
    raw = np.fromfile(os.path.join(data, "train_000000.bin"), dtype="<u2", offset=1024)
    a, b = loader.next(), loader.next()
    check(a.tolist() == raw[:B * T + 1].tolist() and b.tolist() == raw[B * T:2 * B * T + 1].tolist(),
          "contiguous batches: B*T+1 tokens, B*T apart, from the first shard")
    n = len(raw)
    loader.pos = n - B * T  # too short for one more batch: wraps to the start
    check(loader.next().tolist() == raw[:B * T + 1].tolist(), "short tail skipped, wraps around")


def test_checkpoint(lmtrain: str | None) -> None:
    data = os.path.join(REPO, "data", "tiny")
    if not lmtrain or not os.path.isdir(data):
        print("skip checkpoint test: needs --lmtrain and data/tiny")
        return
    from safetensors.torch import load_file
    B, T, depth = 2, 128, 2
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"run.backend": "cpu", "run.dtype": "fp32", "run.out_dir": tmp,
                "model.depth": depth, "model.head_dim": 64, "model.sequence_len": T,
                "batch.device_batch": B, "schedule.num_iterations": 10,
                "checkpoint.save_final": "true", "optim.lr_reference_batch": B * T}
        args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]

        def lmtrain_out(*cmd: str) -> str:
            r = subprocess.run([lmtrain, *cmd], capture_output=True, text=True, cwd=REPO)
            if r.returncode != 0:
                raise RuntimeError(f"lmtrain {cmd[0]} exited {r.returncode}:\n{r.stderr}")
            return r.stdout

        lmtrain_out("train", "--config", os.path.join(HERE, "lmtrain_bench.json"), *args)
        run = os.path.join(tmp, "bench")
        val = sorted(glob.glob(os.path.join(data, "val_*.bin")))[0]
        out = lmtrain_out("eval", "--ckpt", run, "--data", val, "--tokens", str(B * T),
                          "--batch", str(B))
        m = re.search(r"loss ([0-9.]+) \|", out)
        if not m:
            raise RuntimeError(f"lmtrain eval printed no loss line:\n{out}")
        want = float(m.group(1))
        state = load_file(os.path.join(run, "ckpt", "step_000010", "model.safetensors"))
    vocab = tg.read_vocab_size(os.path.join(data, "tokenizer.json"))
    shape = tg.ModelShape(depth=depth, vocab_size=vocab, aspect_ratio=64, head_dim=64,
                          sequence_len=T, window_pattern="SSSL")
    shape.validate()
    model = tg.GPT(shape, "masked")
    model.load_state_dict(state)  # strict: every name and shape, nothing left over
    model.double()
    chunk = tg.ShardBatches(val, B, T, shape.vocab_size).next()
    with torch.no_grad():
        got = model(chunk[:-1].view(B, T), chunk[1:].view(B, T),
                    tg.make_block_masks(shape, torch.device("cpu"), "masked")).item()
    trained = all(state[n].abs().max() > 0 for n in state if n.endswith("c_proj.weight"))
    # eval prints 6 decimals and runs in fp32; a wrong window pattern is off by 8e-4 here.
    check(trained and abs(got - want) < 5e-6,
          f"lmtrain checkpoint in torch: loss {got:.6f} == lmtrain eval {want:.6f} "
          f"(projections trained: {trained})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lmtrain", default="", help="built lmtrain binary: compare FLOP counts and a trained checkpoint")
    a = p.parse_args()
    torch.manual_seed(0)
    test_model(depth=3, n_kv_head=0)
    test_model(depth=4, n_kv_head=1)
    test_attention_kinds()
    test_optimizer()
    test_bf16_polar_express()
    test_flops(a.lmtrain or None)
    test_shards()
    test_checkpoint(a.lmtrain or None)
    print(f"\n{len(FAILURES)} failure(s)" if FAILURES else "\nall checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
