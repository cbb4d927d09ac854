"""An independent PyTorch implementation of the training step (docs/training-step.md).

Written apart from `reference/` on purpose: its own module names (`blocks.0.attn.wq`), its own name map
from checkpoint keys, attention written out with repeated kv heads, RoPE from `rotate_half`, AdamW by
hand in both bias-correction conventions. A golden value is trusted only when this twin and the MLX
reference agree. It exposes the same methods as `mlx_parity.reference.trainer.Trainer`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mlx_parity.reference.config import ModelConfig
from mlx_parity.reference.loss import validate_batch
from mlx_parity.reference.precision import parameter_dtype
from mlx_parity.reference.settings import SettingsError, TrainSettings
from mlx_parity.reference.weights import IGNORED_KEYS, LoadReport, WeightLoadError, checkpoint_files

_LAYER_MAP = {
    "self_attn.q_proj": "attn.wq",
    "self_attn.k_proj": "attn.wk",
    "self_attn.v_proj": "attn.wv",
    "self_attn.o_proj": "attn.wo",
    "mlp.gate_proj": "ffn.w_gate",
    "mlp.up_proj": "ffn.w_up",
    "mlp.down_proj": "ffn.w_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn.q_head_norm",
    "self_attn.k_norm": "attn.k_head_norm",
}


def wide(x: torch.Tensor) -> torch.Tensor:
    """A bfloat16 tensor in float32, where the twin accumulates its norms, rotations and loss; others as they are."""
    return x.float() if x.dtype == torch.bfloat16 else x


def twin_name(hf_key: str) -> str | None:
    """The twin's own parameter name for a checkpoint key, or None if the key names nothing here."""
    if hf_key == "model.embed_tokens.weight":
        return "tok_emb.weight"
    if hf_key == "model.norm.weight":
        return "final_norm.weight"
    if hf_key == "lm_head.weight":
        return "head.weight"
    parts = hf_key.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        sub, leaf = ".".join(parts[3:-1]), parts[-1]
        if sub in _LAYER_MAP:
            return f"blocks.{parts[2]}.{_LAYER_MAP[sub]}.{leaf}"
    return None


class RMSNorm(torch.nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        w = wide(x)  # in bfloat16: accumulated in float32, rounded once
        return (w * torch.rsqrt(w.pow(2).mean(-1, keepdim=True) + self.eps) * wide(self.weight)).to(x.dtype)


class _Widened(torch.autograd.Function):
    """x·Wᵀ (+ b) for a frozen W (and b) stored narrower than x, widened for each product and never kept widened:
    autograd would keep every layer's widened copy until the backward pass, so the float64 truth of a LoRA step
    would hold the model twice over; this way it holds it once, as stored."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None


def linear(x, weight, bias=None):
    """F.linear, with a frozen weight stored narrower than x widened per product (`_Widened`)."""
    if weight.dtype == x.dtype or weight.requires_grad:
        return F.linear(x, weight, bias)
    return _Widened.apply(x, weight, bias)


class Proj(torch.nn.Module):
    """A linear map with an optional LoRA adapter; `lora_a` is [in, r], `lora_b` is [r, out]."""

    def __init__(self, d_in: int, d_out: int, bias: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(d_out, d_in).uniform_(-(d_in**-0.5), d_in**-0.5))
        self.bias = torch.nn.Parameter(torch.zeros(d_out)) if bias else None
        self.lora_a = self.lora_b = None
        self.scale = 0.0

    def forward(self, x):
        y = linear(x, self.weight, self.bias)
        if self.lora_a is not None:  # float32 adapters on a bfloat16 model: their path in float32, the sum in bfloat16
            y = y + (self.scale * ((x.to(self.lora_a.dtype) @ self.lora_a) @ self.lora_b)).to(y.dtype)
        return y


def scaled_inv_freq(inv: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    """The config's RoPE scaling applied to the plain frequencies (written from transformers' rope init
    functions, apart from the reference's numpy version)."""
    p = dict(c.rope_scaling)
    if c.rope_type == "linear":
        return inv / p["factor"]
    if c.rope_type != "llama3":
        return inv
    old_ctx = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / p["low_freq_factor"], old_ctx / p["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > low_wavelen, inv / p["factor"], inv)
    smooth = (old_ctx / wavelen - p["low_freq_factor"]) / (p["high_freq_factor"] - p["low_freq_factor"])
    smoothed = (1 - smooth) * out / p["factor"] + smooth * out
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, out)


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rope(x, cos, sin):
    """RoPE with cos and sin in the wide dtype: a bfloat16 input rotated in float32 and rounded once."""
    w = wide(x)
    return (w * cos + rotate_half(w) * sin).to(x.dtype)


class Block(torch.nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        hd = c.head_dim
        self.attn = torch.nn.Module()
        self.attn.wq = Proj(c.hidden_size, c.num_attention_heads * hd, c.qkv_bias)
        self.attn.wk = Proj(c.hidden_size, c.num_key_value_heads * hd, c.qkv_bias)
        self.attn.wv = Proj(c.hidden_size, c.num_key_value_heads * hd, c.qkv_bias)
        self.attn.wo = Proj(c.num_attention_heads * hd, c.hidden_size, c.o_bias)
        if c.qk_norm:  # Qwen3: each query and key head normed over its own dimensions
            self.attn.q_head_norm = RMSNorm(hd, c.rms_norm_eps)
            self.attn.k_head_norm = RMSNorm(hd, c.rms_norm_eps)
        self.ffn = torch.nn.Module()
        self.ffn.w_gate = Proj(c.hidden_size, c.intermediate_size, c.mlp_bias)
        self.ffn.w_up = Proj(c.hidden_size, c.intermediate_size, c.mlp_bias)
        self.ffn.w_down = Proj(c.intermediate_size, c.hidden_size, c.mlp_bias)
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.ffn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def heads(self, x, which: str):
        """[B, T, n·hd] -> [B, n, T, hd]; Qwen3's q and k heads normed first (in [B, T, n, hd], as transformers)."""
        c, (B, T, _) = self.c, x.shape
        y = x.view(B, T, -1, c.head_dim)
        if c.qk_norm and which in ("q", "k"):
            y = getattr(self.attn, f"{which}_head_norm")(y)
        return y.transpose(1, 2)

    def attention(self, x, cos, sin):
        c, (B, T, _) = self.c, x.shape
        hd, H, K = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        q, k, v = self.heads(self.attn.wq(x), "q"), self.heads(self.attn.wk(x), "k"), self.heads(self.attn.wv(x), "v")
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        k = k.repeat_interleave(H // K, dim=1)  # query head h uses kv head h // n_rep
        v = v.repeat_interleave(H // K, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        o = torch.softmax(scores, dim=-1) @ v
        return self.attn.wo(o.transpose(1, 2).reshape(B, T, H * hd))

    def pieces(self, g, cos, sin):
        """Each piece of the block from the given values of its inputs (the isolated forward check)."""
        c, (B, T, _) = self.c, g["input"].shape
        hd, H, K = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        expand = lambda x: x.repeat_interleave(H // K, dim=1)  # noqa: E731
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        ffn = self.ffn
        return {
            "input_norm": self.attn_norm(g["input"]),
            "q": self.heads(self.attn.wq(g["input_norm"]), "q"),
            "k": self.heads(self.attn.wk(g["input_norm"]), "k"),
            "v": self.heads(self.attn.wv(g["input_norm"]), "v"),
            "q_rope": rope(g["q"], cos, sin),
            "k_rope": rope(g["k"], cos, sin),
            "scores": (g["q_rope"] @ expand(g["k_rope"]).transpose(-1, -2)) / math.sqrt(hd),
            "probs": torch.softmax(g["scores"].masked_fill(~causal, float("-inf")), dim=-1),
            "attn": (g["probs"] @ expand(g["v"])).transpose(1, 2).reshape(B, T, H * hd),
            "o_proj": self.attn.wo(g["attn"]),
            "post_norm": self.ffn_norm(g["input"] + g["o_proj"]),
            "gate": ffn.w_gate(g["post_norm"]),
            "up": ffn.w_up(g["post_norm"]),
            "act": F.silu(g["gate"]) * g["up"],
            "down": ffn.w_down(g["act"]),
            "output": self(g["input"], cos, sin),
        }

    def forward(self, h, cos, sin):
        h = h + self.attention(self.attn_norm(h), cos, sin)
        x = self.ffn_norm(h)
        return h + self.ffn.w_down(F.silu(self.ffn.w_gate(x)) * self.ffn.w_up(x))


class TwinLlama(torch.nn.Module):
    def __init__(self, c: ModelConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.c = c
        # What it computes in. Parameters the step trains are held in it; frozen ones keep the dtype the contract
        # stores them in (float32, or bfloat16 under that precision) and are widened where used.
        self.dtype = dtype
        self.tok_emb = torch.nn.Embedding(c.vocab_size, c.hidden_size)
        self.blocks = torch.nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.head = None if c.tie_word_embeddings else Proj(c.hidden_size, c.vocab_size, False)

    def rope(self, T: int):
        d, dtype = self.c.head_dim, wide(torch.empty(0, dtype=self.dtype)).dtype
        inv_freq = scaled_inv_freq(
            1.0 / (self.c.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)), self.c
        ).to(dtype)
        angles = torch.outer(torch.arange(T, dtype=dtype), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

    def forward(self, ids):
        cos, sin = self.rope(ids.shape[1])
        h, hidden = self.tok_emb(ids).to(self.dtype), []
        for block in self.blocks:
            h = block(h, cos, sin)
            hidden.append(h)
        return self.logits(self.final_norm(h)), hidden

    def logits(self, x):
        if self.head is not None:
            return self.head(x)
        w = (
            self.tok_emb.weight
        )  # tied; `x @ w.T` as before where no widening is needed, so the goldens stay bit for bit
        return x @ w.T if w.dtype == x.dtype else linear(x, w)

    def pieces(self, ids, g):
        cos, sin = self.rope(ids.shape[1])
        out = {"embed": self.tok_emb(ids).to(self.dtype)}
        for i, block in enumerate(self.blocks):
            inputs = {k.removeprefix(f"layer.{i}."): v for k, v in g.items() if k.startswith(f"layer.{i}.")}
            inputs["input"] = g["embed"] if i == 0 else g[f"layer.{i - 1}.output"]
            out |= {f"layer.{i}.{k}": v for k, v in block.pieces(inputs, cos, sin).items()}
        out["head.norm"] = self.final_norm(g[f"layer.{len(self.blocks) - 1}.output"])
        out["head.logits"] = self.logits(g["head.norm"])
        return out


def _assign(model: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    """Make `t` the parameter `name` (replacing a placeholder without data: a real model is never built twice)."""
    *path, leaf = name.split(".")
    setattr(model.get_submodule(".".join(path)), leaf, torch.nn.Parameter(t, requires_grad=False))


def lr_at(settings: TrainSettings, s: int) -> float:
    """The learning rate of the update that follows `s` earlier updates."""
    o, sc = settings.optimizer, settings.schedule
    if sc.kind == "constant":
        return o.lr
    if s < sc.warmup_steps:
        return sc.warmup_init + s * (o.lr - sc.warmup_init) / sc.warmup_steps
    k = min(s - sc.warmup_steps, sc.decay_steps)
    return sc.end_lr + 0.5 * (1 + math.cos(math.pi * k / sc.decay_steps)) * (o.lr - sc.end_lr)


class TwinTrainer:
    """The twin's trainer; method for method the same surface as `mlx_parity.reference.trainer.Trainer`."""

    def __init__(self, model: TwinLlama, settings: TrainSettings, lora_init: dict[str, torch.Tensor] | None = None):
        self.model, self.settings = model, settings
        self.dtype = model.dtype  # the model's: bfloat16 under that precision, float64 for the truth
        self.wide = wide(torch.empty(0, dtype=self.dtype)).dtype  # adapters, the loss, the batch's floats
        # Added to every update's gradient (after accumulation, before clipping): how the float64 truth
        # measures what a gradient error of a given size does to the updates (harness/fixtures/truth.py).
        # One offset per update, in turn (update k gets grad_offset[k % len]).
        self.grad_offset: list[dict[str, torch.Tensor]] | None = None
        self.hf_to_twin = {}
        for name, _ in model.named_parameters():
            self.hf_to_twin[self._hf_name(name)] = name
        if settings.trainable == "lora":
            self._add_lora(lora_init)
        elif lora_init is not None:
            raise SettingsError("lora_init given but trainable is not 'lora'")
        self.trainable = self._trainable_set()
        for name, p in self.trainable.items():  # trained weights in the model's dtype (adapters are made in theirs)
            if not name.endswith(("lora_a", "lora_b")):
                p.data = p.data.to(self.dtype)
        # Trained parameters a bfloat16 step stores in bfloat16, kept in a wider dtype here (the float64 truth): rounded
        # to bfloat16 after each update, with their moments, as the contract stores them.
        self.stored_bf16 = {
            n
            for n in self.trainable
            if self.dtype != torch.bfloat16 and parameter_dtype(n, settings.precision) == "bfloat16"
        }
        # AdamW's moments, made at the first update: a twin that only computes holds none (two copies of the
        # trained weights, for full training)
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.step_count = 0

    def _hf_name(self, twin: str) -> str:
        inverse = {v: k for k, v in _LAYER_MAP.items()}
        if twin.startswith("blocks."):
            _, i, *mid, leaf = twin.split(".")
            return f"model.layers.{i}.{inverse['.'.join(mid)]}.{leaf}"
        return {
            "tok_emb.weight": "model.embed_tokens.weight",
            "final_norm.weight": "model.norm.weight",
            "head.weight": "lm_head.weight",
        }[twin]

    @classmethod
    def from_pretrained(
        cls,
        checkpoint,
        settings: TrainSettings,
        lora_init=None,
        strict: bool = True,
        dtype: torch.dtype = torch.float32,
    ):
        """Load checkpoint tensors (float32, or bfloat16/float16 cast exactly to float32); compute in `dtype`
        (float64 for the truth). Under `precision: bfloat16` every tensor is rounded to bfloat16 first and the
        model computes in bfloat16, unless `dtype` is float64: the truth of that step is exact arithmetic on
        the same bfloat16 weights."""
        c = ModelConfig.from_file(checkpoint)
        stored = torch.bfloat16 if settings.precision == "bfloat16" else torch.float32  # the contract's parameters
        with torch.device("meta"):  # no memory until each parameter is given its checkpoint tensor
            model = TwinLlama(c, stored if dtype != torch.float64 else dtype)
        own = dict(model.named_parameters())
        report, loaded = LoadReport(), set()
        for f in checkpoint_files(Path(checkpoint)):
            with safe_open(str(f), framework="pt") as st:  # one tensor at a time: a real model is never held twice
                for key in sorted(st.keys()):
                    if IGNORED_KEYS.search(key):
                        report.ignored.append(key)
                        continue
                    name = twin_name(key)
                    if name is None or name not in own:
                        report.unexpected.append(key)
                        continue
                    t = st.get_tensor(key)
                    if t.shape != own[name].shape or not t.is_floating_point():
                        report.mismatched.append(
                            f"{key}: checkpoint {tuple(t.shape)} {t.dtype}, model {tuple(own[name].shape)} {own[name].dtype}"
                        )
                    else:
                        _assign(model, name, t.to(stored))
                        loaded.add(name)
        if set(own) - loaded:  # what the checkpoint lacks gets a fresh module's initial values
            fresh = dict(TwinLlama(c).named_parameters())
            for name in set(own) - loaded:
                _assign(model, name, fresh[name].detach().to(stored))
        bad = {m.split(":")[0] for m in report.mismatched}
        report.missing = sorted(cls._hf_name(None, n) for n in set(own) - loaded if cls._hf_name(None, n) not in bad)
        if strict and not report.ok:
            raise WeightLoadError(report, Path(checkpoint))
        if isinstance(lora_init, (str, Path)):
            lora_init = load_file(str(lora_init))
        trainer = cls(model, settings, lora_init)
        trainer.report = report
        return trainer, report

    def _add_lora(self, init):
        c, lo = self.model.c, self.settings.lora
        for i in range(c.num_hidden_layers - lo.layers, c.num_hidden_layers):
            for hf, tw in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
                proj = getattr(self.model.blocks[i].attn, tw)
                d_out, d_in = proj.weight.shape
                a = torch.empty(d_in, lo.rank, dtype=self.wide).uniform_(-(d_in**-0.5), d_in**-0.5)
                b = torch.zeros(lo.rank, d_out, dtype=self.wide)
                for leaf, t in (("lora_a", a), ("lora_b", b)):
                    key = f"model.layers.{i}.self_attn.{hf}.{leaf}"
                    if init is not None:
                        if key not in init or init[key].shape != t.shape:
                            raise WeightLoadError(LoadReport(missing=[key]), Path("lora_init"))
                        t = init[key].to(self.wide).clone()
                    setattr(proj, leaf, torch.nn.Parameter(t))
                    self.hf_to_twin[key] = f"blocks.{i}.attn.{tw}.{leaf}"
                proj.scale = lo.scale
        if init is not None:
            extra = sorted(set(init) - set(self.hf_to_twin))
            if extra:
                raise WeightLoadError(LoadReport(unexpected=extra), Path("lora_init"))

    def _trainable_set(self) -> dict[str, torch.nn.Parameter]:
        own = dict(self.model.named_parameters())
        kind, tied = self.settings.trainable, self.model.c.tie_word_embeddings
        if kind == "full":
            names = [n for n in self.hf_to_twin if not n.endswith(("lora_a", "lora_b"))]
        elif kind == "head":
            names = ["model.embed_tokens.weight" if tied else "lm_head.weight", "model.norm.weight"]
        else:
            names = [n for n in self.hf_to_twin if n.endswith(("lora_a", "lora_b"))]
        for p in own.values():
            p.requires_grad_(False)
        chosen = {n: own[self.hf_to_twin[n]] for n in sorted(names)}
        for p in chosen.values():
            p.requires_grad_(True)
        return chosen

    def trainable_names(self) -> list[str]:
        return list(self.trainable)

    def parameters(self) -> dict[str, torch.Tensor]:
        own = dict(self.model.named_parameters())
        return {hf: own[tw].detach() for hf, tw in sorted(self.hf_to_twin.items())}

    # --- numerics -------------------------------------------------------------------------
    def _batch(self, batch):
        validate_batch(batch)
        floats = (np.asarray(batch[k], dtype=np.float32) for k in ("attention_mask", "auth_weight", "prov_entropy"))
        return (
            torch.as_tensor(np.asarray(batch["input_ids"], dtype=np.int64)),
            *(torch.as_tensor(x).to(self.wide) for x in floats),
        )

    def forward(self, input_ids):
        with torch.no_grad():
            return self.model(torch.as_tensor(np.asarray(input_ids, dtype=np.int64)))

    def _loss(self, batch, logits=None):
        ids, mask, w, h = self._batch(batch)
        if logits is None:
            logits, _ = self.model(ids)
        logits = logits.to(self.wide)
        target_mask = mask[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        ce = (nll * target_mask.reshape(-1)).sum() / target_mask.sum()
        alpha, lam = self.settings.loss.alpha, self.settings.loss.lam
        distrust = (alpha * (torch.log(1 - w + 1e-8) + h) ** 2).mean()
        return {"ce": ce, "distrust": distrust, "total": ce + lam * distrust}

    def loss(self, batch) -> dict[str, float]:
        with torch.no_grad():
            return {k: v.item() for k, v in self._loss(batch).items()}

    def loss_from_logits(self, logits, batch) -> dict[str, float]:
        """The loss parts of given logits (the isolated loss check)."""
        with torch.no_grad():
            given = torch.as_tensor(np.asarray(logits, dtype=np.float32)).to(self.wide)
            return {k: v.item() for k, v in self._loss(batch, given).items()}

    def pieces(self, input_ids, given) -> dict[str, torch.Tensor]:
        """The forward's pieces, each from the given values of its inputs (the isolated forward check)."""
        with torch.no_grad():
            g = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)).to(self.dtype) for k, v in given.items()}
            return self.model.pieces(torch.as_tensor(np.asarray(input_ids, dtype=np.int64)), g)

    def update_from_gradients(self, grads) -> None:
        """One update with given gradients (the isolated optimizer check)."""
        self._update(
            {
                k: torch.as_tensor(np.asarray(v, dtype=np.float32)).to(
                    self.trainable[k].dtype if k in self.trainable else self.wide
                )
                for k, v in grads.items()
            }
        )

    def gradients(self, batch):
        parts = self._loss(batch)
        grads = torch.autograd.grad(parts["total"], list(self.trainable.values()), allow_unused=True)
        out = {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(self.trainable.items(), grads)}
        return {k: v.item() for k, v in parts.items()}, out

    def step(self, batch) -> dict[str, float]:
        """One update. Under `torch.distributed` (started by torchrun) each rank takes its contiguous share of
        every micro-batch, and gradients and losses are averaged over the ranks (docs/training-step.md)."""
        validate_batch(batch)
        n = self.settings.accum_steps
        B = len(batch["input_ids"])
        if B % n:
            raise SettingsError(f"batch size {B} is not divisible by accum_steps={n}")
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        if (B // n) % world:
            raise SettingsError(f"micro-batch size {B // n} is not divisible by the world size {world}")
        size, share, acc, losses = B // n, B // n // world, None, []
        for i in range(n):
            lo = i * size + rank * share
            parts, g = self.gradients({k: v[lo : lo + share] for k, v in batch.items()})
            acc = g if acc is None else {k: acc[k] + g[k] for k in acc}
            losses.append([parts[k] for k in ("total", "ce", "distrust")])
        grads = {k: g / n for k, g in acc.items()} if n > 1 else acc
        if world > 1:
            for g in grads.values():
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
            grads = {k: g / world for k, g in grads.items()}
            every = [None] * world
            dist.all_gather_object(every, losses)  # each rank's losses, summed in rank order as one process would
            losses, n = [row for ranked in every for row in ranked], n * world
        self._update(grads)
        return {k: sum(row[i] for row in losses) / n for i, k in enumerate(("total", "ce", "distrust"))}

    def _update(self, grads) -> None:
        """Clip (globally), then AdamW; this update's `grad_offset`, when set, is added first."""
        if self.grad_offset is not None:
            offset = self.grad_offset[self.step_count % len(self.grad_offset)]
            grads = {k: g + offset[k] for k, g in grads.items()}
        if self.settings.clip_norm is not None:
            total = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).to(self.wide)
            coef = torch.clamp(self.settings.clip_norm / (total + 1e-6), max=1.0)
            grads = {k: g * coef.to(g.dtype) for k, g in grads.items()}
        self._adamw(grads)

    @torch.no_grad()
    def _adamw(self, grads):
        o = self.settings.optimizer
        lr, b1, b2 = lr_at(self.settings, self.step_count), *o.betas
        self.step_count += 1
        t = self.step_count
        for name, p in self.trainable.items():
            g = grads[name]
            m, v = self.m.setdefault(name, torch.zeros_like(p)), self.v.setdefault(name, torch.zeros_like(p))
            p.mul_(1 - lr * o.weight_decay)
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            if o.bias_correction:
                denom = v.sqrt() / math.sqrt(1 - b2**t) + o.eps
                p.addcdiv_(m, denom, value=-lr / (1 - b1**t))
            else:
                p.addcdiv_(m, v.sqrt() + o.eps, value=-lr)
            if name in self.stored_bf16:  # the truth of a bfloat16 step: exact arithmetic, bfloat16 storage
                for x in (p, m, v):
                    x.copy_(x.to(torch.bfloat16))

    def optimizer_state(self) -> dict:
        return {"step": self.step_count, "m": dict(self.m), "v": dict(self.v)}

    # --- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in self.parameters().items()}, str(path / "params.safetensors"))
        opt = {f"m.{k}": v for k, v in self.m.items()} | {f"v.{k}": v for k, v in self.v.items()}
        save_file(opt, str(path / "optimizer.safetensors"))
        meta = {
            "step": self.step_count,
            "settings": self.settings.to_dict(),
            "config": self.model.c.to_hf_dict(),
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        (path / "twin.json").write_text(json.dumps(meta))

    @classmethod
    def load_checkpoint(cls, path) -> TwinTrainer:
        path = Path(path)
        meta = json.loads((path / "twin.json").read_text())
        settings = TrainSettings.from_dict(meta["settings"])
        params = load_file(str(path / "params.safetensors"))
        lora = {k: v for k, v in params.items() if k.endswith(("lora_a", "lora_b"))} or None
        with torch.device("meta"):
            model = TwinLlama(ModelConfig.from_dict(meta["config"]), getattr(torch, meta.get("dtype", "float32")))
        own = dict(model.named_parameters())
        for k, t in params.items():  # each as saved: trained ones in the model's dtype, frozen ones as stored
            if twin_name(k) in own:
                _assign(model, twin_name(k), t)
        trainer = cls(model, settings, lora)
        if set(params) != set(trainer.hf_to_twin):
            raise WeightLoadError(
                LoadReport(
                    missing=sorted(set(trainer.hf_to_twin) - set(params)),
                    unexpected=sorted(set(params) - set(trainer.hf_to_twin)),
                ),
                path,
            )
        opt = load_file(str(path / "optimizer.safetensors"))
        trainer.m = {k: opt[f"m.{k}"] for k in trainer.trainable}
        trainer.v = {k: opt[f"v.{k}"] for k in trainer.trainable}
        trainer.step_count = meta["step"]
        return trainer
