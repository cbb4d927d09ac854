"""The GPU training-step benchmark's worker: one framework, one model size, one precision, in this process.

`python -m mlx_parity.bench.gpu FRAMEWORK SIZE PRECISION [--variants a,b] [--steps N] [--device gpu|cpu]`
prints one JSON line per variant: the median step time of a Llama training step (forward, backward,
AdamW) on a fixed random batch, and its tokens/s. `harness/bench/gpu.py:run_gpu` starts one such process
per (framework, size, precision), so neither framework's memory cache or compile cache affects the
other, and MLX reads `MLX_ENABLE_TF32` fresh. `peak` measures the dense-matmul peak instead, and
`gemm:SIZE` times each matrix product of that size's step alone (where the step's time goes).

The step is the same in both frameworks and written apart from the audited reference (which computes
in float32 only and synchronises with the host every step): the Llama architecture of
`reference/model.py` (RMSNorm, grouped-query attention with RoPE, SwiGLU, untied head), initialised
from the same distributions in both (not the same values: compare the loss columns), the mean
cross-entropy of shifted tokens computed in float32, and AdamW (bias-corrected, eps 1e-8, wd 0.01),
no clipping. Precision: `fp32` (float32, TF32 off), `tf32` (float32 parameters, TF32 matmuls), `bf16`
(parameters, activations and AdamW state in bfloat16: "pure bf16" in both frameworks).

Variants. torch: `sdpa` (F.scaled_dot_product_attention, eager: the baseline). MLX: `explicit`
(softmax attention written out, as the reference does, no compile), `sdpa` (mx.fast.scaled_dot_product_attention),
`sdpa+compile` (the same, the whole step including the AdamW update under mx.compile).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass

VOCAB = 32000


@dataclass(frozen=True)
class GpuSize:
    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    batch: int
    seq_len: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    def params(self) -> int:
        d, hd = self.hidden, self.head_dim
        attn = d * self.heads * hd * 2 + d * self.kv_heads * hd * 2
        return 2 * VOCAB * d + d + self.layers * (attn + 3 * d * self.intermediate + 2 * d)

    def flops_per_step(self) -> float:
        """6 × (parameters that multiply: all but the embedding table) × tokens, plus attention's own
        12 × layers × heads × head_dim × T per token (PaLM's count, causal masking not halved)."""
        matmul_params = self.params() - VOCAB * self.hidden
        attn = 12 * self.layers * self.heads * self.head_dim * self.seq_len
        return float(self.tokens * (6 * matmul_params + attn))


GPU_SIZES = {
    "60M": GpuSize("60M", hidden=512, layers=8, intermediate=1536, heads=8, kv_heads=4, batch=8, seq_len=1024),
    "250M": GpuSize("250M", hidden=1024, layers=14, intermediate=2816, heads=16, kv_heads=4, batch=8, seq_len=1024),
    "1B": GpuSize("1B", hidden=2048, layers=16, intermediate=5632, heads=32, kv_heads=8, batch=4, seq_len=1024),
    # a few seconds on a CPU: what the tests run
    "tiny": GpuSize("tiny", hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, batch=2, seq_len=32),
}
PRECISIONS = ("fp32", "tf32", "bf16")
VARIANTS = {"torch": ("sdpa",), "mlx": ("explicit", "sdpa", "sdpa+compile")}


def batch(size: GpuSize, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, VOCAB, size=(size.batch, size.seq_len + 1), dtype=np.int32)


# --- MLX -------------------------------------------------------------------------------------------------


def mlx_step(size: GpuSize, precision: str, variant: str, device: str):
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
    s, hd = size, size.head_dim
    fused, compiled = variant.startswith("sdpa"), variant.endswith("compile")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(s.hidden, s.heads * hd, bias=False)
            self.k = nn.Linear(s.hidden, s.kv_heads * hd, bias=False)
            self.v = nn.Linear(s.hidden, s.kv_heads * hd, bias=False)
            self.o = nn.Linear(s.heads * hd, s.hidden, bias=False)
            self.gate = nn.Linear(s.hidden, s.intermediate, bias=False)
            self.up = nn.Linear(s.hidden, s.intermediate, bias=False)
            self.down = nn.Linear(s.intermediate, s.hidden, bias=False)
            self.n1, self.n2 = nn.RMSNorm(s.hidden, eps=1e-5), nn.RMSNorm(s.hidden, eps=1e-5)
            self.rope = nn.RoPE(hd, traditional=False, base=10000.0)

        def attention(self, x):
            B, T, _ = x.shape
            q = self.rope(self.q(x).reshape(B, T, s.heads, hd).transpose(0, 2, 1, 3))
            k = self.rope(self.k(x).reshape(B, T, s.kv_heads, hd).transpose(0, 2, 1, 3))
            v = self.v(x).reshape(B, T, s.kv_heads, hd).transpose(0, 2, 1, 3)
            if fused:
                o = mx.fast.scaled_dot_product_attention(q, k, v, scale=hd**-0.5, mask="causal")
            else:
                k, v = mx.repeat(k, s.heads // s.kv_heads, axis=1), mx.repeat(v, s.heads // s.kv_heads, axis=1)
                scores = (q @ k.transpose(0, 1, 3, 2)) * hd**-0.5
                causal = mx.arange(T)[None, :] <= mx.arange(T)[:, None]
                o = mx.softmax(mx.where(causal, scores, mx.array(-mx.inf, scores.dtype)), axis=-1, precise=True) @ v
            return self.o(o.transpose(0, 2, 1, 3).reshape(B, T, -1))

        def __call__(self, x):
            x = x + self.attention(self.n1(x))
            h = self.n2(x)
            return x + self.down(nn.silu(self.gate(h)) * self.up(h))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, s.hidden)
            self.layers = [Block() for _ in range(s.layers)]
            self.norm = nn.RMSNorm(s.hidden, eps=1e-5)
            self.head = nn.Linear(s.hidden, VOCAB, bias=False)

        def __call__(self, ids):
            h = self.embed(ids)
            for layer in self.layers:
                h = layer(h)
            return self.head(self.norm(h))

    mx.random.seed(0)
    model = Model()
    if precision == "bf16":
        model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    opt = optim.AdamW(learning_rate=1e-4, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.01, bias_correction=True)
    opt.init(model.trainable_parameters())  # the state exists before mx.compile captures it

    def loss_fn(m, x, y):
        logits = m(x).astype(mx.float32)
        return nn.losses.cross_entropy(logits, y, reduction="mean")

    value_and_grad = nn.value_and_grad(model, loss_fn)

    def step(x, y):
        loss, grads = value_and_grad(model, x, y)
        opt.update(model, grads)
        return loss

    state = [model.state, opt.state]
    if compiled:
        from functools import partial

        step = partial(mx.compile, inputs=state, outputs=state)(step)
    ids = mx.array(batch(size))
    x, y = ids[:, :-1], ids[:, 1:]

    def run():
        loss = step(x, y)
        mx.eval(loss, state)
        return float(loss.item())

    def cleanup():
        mx.clear_cache()

    return run, cleanup, (lambda: mx.get_peak_memory() / 2**30)


# --- torch -----------------------------------------------------------------------------------------------


def torch_step(size: GpuSize, precision: str, variant: str, device: str):
    import torch
    import torch.nn.functional as F

    dev = torch.device("cuda" if device == "gpu" else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    s, hd = size, size.head_dim
    torch.manual_seed(0)

    def lin(i, o):
        return torch.nn.Linear(i, o, bias=False)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (
                lin(s.hidden, s.heads * hd),
                lin(s.hidden, s.kv_heads * hd),
                lin(s.hidden, s.kv_heads * hd),
                lin(s.heads * hd, s.hidden),
            )
            self.gate, self.up, self.down = (
                lin(s.hidden, s.intermediate),
                lin(s.hidden, s.intermediate),
                lin(s.intermediate, s.hidden),
            )
            self.n1, self.n2 = torch.nn.RMSNorm(s.hidden, eps=1e-5), torch.nn.RMSNorm(s.hidden, eps=1e-5)

        def forward(self, x, cos, sin):
            B, T, _ = x.shape
            h = self.n1(x)
            q = self.q(h).view(B, T, s.heads, hd).transpose(1, 2)
            k = self.k(h).view(B, T, s.kv_heads, hd).transpose(1, 2)
            v = self.v(h).view(B, T, s.kv_heads, hd).transpose(1, 2)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + self.o(o.transpose(1, 2).reshape(B, T, -1))
            h = self.n2(x)
            return x + self.down(F.silu(self.gate(h)) * self.up(h))

    def rope(x, cos, sin):
        a, b = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-b, a), dim=-1) * sin

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, s.hidden)
            self.layers = torch.nn.ModuleList(Block() for _ in range(s.layers))
            self.norm = torch.nn.RMSNorm(s.hidden, eps=1e-5)
            self.head = lin(s.hidden, VOCAB)

        def forward(self, ids):
            T = ids.shape[1]
            inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, device=ids.device, dtype=torch.float32) / hd))
            ang = torch.outer(torch.arange(T, device=ids.device, dtype=torch.float32), inv)
            ang = torch.cat((ang, ang), dim=-1)
            cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
            h = self.embed(ids)
            for layer in self.layers:
                h = layer(h, cos, sin)
            return self.head(self.norm(h))

    model = Model()
    torch.nn.init.normal_(
        model.embed.weight, std=s.hidden**-0.5
    )  # MLX's nn.Embedding init (torch's is N(0, 1)); Linear inits agree
    model = model.to(device=dev, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ids = torch.as_tensor(batch(size), dtype=torch.long, device=dev)
    x, y = ids[:, :-1], ids[:, 1:]

    def run():
        opt.zero_grad(set_to_none=True)
        logits = model(x).float()
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.item())

    def cleanup():
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    peak = (lambda: torch.cuda.max_memory_allocated() / 2**30) if dev.type == "cuda" else (lambda: 0.0)
    return run, cleanup, peak


# --- timing ----------------------------------------------------------------------------------------------


def time_variant(
    framework: str, size: GpuSize, precision: str, variant: str, device: str, steps: int, warmup: int
) -> dict:
    make = mlx_step if framework == "mlx" else torch_step
    t0 = time.perf_counter()
    run, cleanup, peak_mem = make(size, precision, variant, device)
    setup_s = time.perf_counter() - t0
    losses, times = [], []
    t0 = time.perf_counter()
    for _ in range(warmup):
        losses.append(run())
    warmup_s = time.perf_counter() - t0
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(run())
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    out = {
        "framework": framework,
        "size": size.name,
        "precision": precision,
        "variant": variant,
        "device": device,
        "params": size.params(),
        "tokens": size.tokens,
        "flops": size.flops_per_step(),
        "steps": steps,
        "median_s": median,
        "min_s": times[0],
        "max_s": times[-1],
        "tokens_per_s": size.tokens / median,
        "tflops": size.flops_per_step() / median / 1e12,
        "setup_s": setup_s,
        "warmup_s": warmup_s,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "peak_mem_gib": peak_mem(),
        "finite": all(math.isfinite(v) for v in losses),
    }
    cleanup()
    return out


def matmul_peak(framework: str, precision: str, n: int = 8192, reps: int = 10) -> dict:
    """Dense n×n×n matmul rate on the GPU (random data, median of `reps` after warm-up)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    times = []
    if framework == "mlx":
        import mlx.core as mx

        mx.set_default_device(mx.gpu)
        dt = mx.bfloat16 if precision == "bf16" else mx.float32
        xa, xb = mx.array(a).astype(dt), mx.array(b).astype(dt)
        mx.eval(xa, xb)
        for i in range(reps + 3):
            t0 = time.perf_counter()
            c = xa @ xb
            mx.eval(c)
            if i >= 3:
                times.append(time.perf_counter() - t0)
    else:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        dt = torch.bfloat16 if precision == "bf16" else torch.float32
        xa, xb = torch.as_tensor(a, device="cuda").to(dt), torch.as_tensor(b, device="cuda").to(dt)
        for i in range(reps + 3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            c = xa @ xb
            torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    return {
        "framework": framework,
        "precision": precision,
        "n": n,
        "median_s": median,
        "tflops": 2 * n**3 / median / 1e12,
    }


def step_gemms(size: GpuSize) -> list[tuple[str, int, int, int, int]]:
    """The matrix products of one training step: (name, count, N, K, M) for each linear map's forward
    [N,K]@[K,M] and its two backward products (dX = dY W, dW = dYᵀ X) as separate entries."""
    N, d, hd, inter = size.tokens, size.hidden, size.head_dim, size.intermediate
    L = size.layers
    maps = [
        ("q", L, d, size.heads * hd),
        ("k,v", 2 * L, d, size.kv_heads * hd),
        ("o", L, size.heads * hd, d),
        ("gate,up", 2 * L, d, inter),
        ("down", L, inter, d),
        ("head", 1, d, VOCAB),
    ]
    out = []
    for name, count, k, m in maps:
        out += [(f"{name} fwd", count, N, k, m), (f"{name} dX", count, N, m, k), (f"{name} dW", count, m, N, k)]
    return out


def gemm_profile(framework: str, size: GpuSize, precision: str, reps: int = 10) -> dict:
    """Each of `step_gemms(size)` timed alone in `framework` on the GPU: `reps` products issued back to back
    and synchronised once (so the per-call host overhead of either framework is amortised, as it is in a
    training step), after a warm-up; the sum weighted by count is the step's matmul time."""
    import numpy as np

    rng = np.random.default_rng(0)
    rows, total = [], 0.0
    if framework == "mlx":
        import mlx.core as mx

        mx.set_default_device(mx.gpu if mx.is_available(mx.gpu) else mx.cpu)  # the CPU: only where tests run it
        dt = mx.bfloat16 if precision == "bf16" else mx.float32

        def make(r, c):
            x = mx.array(rng.standard_normal((r, c), dtype=np.float32)).astype(dt)
            mx.eval(x)
            return x

        def timed(a, b, n):
            mx.synchronize()
            t0 = time.perf_counter()
            mx.eval(
                [a @ b for _ in range(n)]
            )  # one graph of n independent products, as a step evaluates its graph once
            mx.synchronize()
            return (time.perf_counter() - t0) / n
    else:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        dt = torch.bfloat16 if precision == "bf16" else torch.float32
        where = "cuda" if torch.cuda.is_available() else "cpu"
        sync = torch.cuda.synchronize if where == "cuda" else (lambda: None)

        def make(r, c):
            return torch.as_tensor(rng.standard_normal((r, c), dtype=np.float32), device=where).to(dt)

        def timed(a, b, n):
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                a @ b
            sync()
            return (time.perf_counter() - t0) / n

    for name, count, n, k, m in step_gemms(size):
        a, b = make(n, k), make(k, m)
        timed(a, b, 2)
        t = min(timed(a, b, reps) for _ in range(2))
        rows.append(
            {"gemm": name, "count": count, "shape": [n, k, m], "ms": 1e3 * t, "tflops": 2 * n * k * m / t / 1e12}
        )
        total += count * t
    return {"framework": framework, "size": size.name, "precision": precision, "total_ms": 1e3 * total, "gemms": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlx_parity.bench.gpu")
    p.add_argument("framework", choices=("mlx", "torch"))
    p.add_argument(
        "size", help=f"one of {', '.join(GPU_SIZES)}, 'peak', or 'gemm:SIZE' (that size's step GEMMs timed alone)"
    )
    p.add_argument("precision", choices=PRECISIONS)
    p.add_argument("--variants", default="")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="gpu", choices=("gpu", "cpu"))
    a = p.parse_args(argv)
    if a.framework == "mlx" and os.environ.get("MLX_ENABLE_TF32") != ("1" if a.precision == "tf32" else "0"):
        print(
            f"MLX_ENABLE_TF32 must be {'1' if a.precision == 'tf32' else '0'} for {a.precision} (set by harness/bench/gpu.py)",
            file=sys.stderr,
        )
        return 2
    if a.size == "peak":
        print(json.dumps({"peak": matmul_peak(a.framework, a.precision)}), flush=True)
        return 0
    if a.size.startswith("gemm:"):
        print(
            json.dumps({"gemm": gemm_profile(a.framework, GPU_SIZES[a.size.removeprefix("gemm:")], a.precision)}),
            flush=True,
        )
        return 0
    size = GPU_SIZES[a.size]
    for v in a.variants.split(",") if a.variants else VARIANTS[a.framework]:
        try:
            r = time_variant(a.framework, size, a.precision, v, a.device, a.steps, a.warmup)
        except Exception as e:  # one variant's failure (out of memory, a missing kernel) is its row, not the end
            r = {
                "framework": a.framework,
                "size": size.name,
                "precision": a.precision,
                "variant": v,
                "error": f"{type(e).__name__}: {e}"[:500],
            }
        print(json.dumps({"result": r}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
