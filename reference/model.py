"""The Llama module tree in MLX, named exactly like a Hugging Face checkpoint.

Parameter paths (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`) equal the checkpoint keys,
so the name map in `weights.py` is explicit and short. LoRA adapters live on the projection itself
(`...q_proj.lora_a`, `...q_proj.lora_b`).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig


class Linear(nn.Module):
    """`y = x W^T (+ b)`, with an optional LoRA adapter `+ scale * (x @ lora_a) @ lora_b`."""

    def __init__(self, in_dims: int, out_dims: int, bias: bool):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dims)
        self.weight = mx.random.uniform(-bound, bound, (out_dims, in_dims))
        if bias:
            self.bias = mx.zeros((out_dims,))
        self.lora_scale = None

    def add_lora(self, rank: int, scale: float) -> None:
        out_dims, in_dims = self.weight.shape
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))
        self.lora_scale = scale

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self.weight.T
        if "bias" in self:
            y = y + self.bias
        if self.lora_scale is not None:
            y = y + self.lora_scale * ((x @ self.lora_a) @ self.lora_b)
        return y


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = Linear(d, self.n_heads * self.head_dim, b)
        self.k_proj = Linear(d, self.n_kv * self.head_dim, b)
        self.v_proj = Linear(d, self.n_kv * self.head_dim, b)
        self.o_proj = Linear(self.n_heads * self.head_dim, d, b)
        self.rope = nn.RoPE(self.head_dim, traditional=False, base=cfg.rope_theta)

    def __call__(self, x: mx.array) -> mx.array:
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, T, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)
        # RoPE reads positions from axis -2, hence [B, H, T, D]; the fused attention shares kv heads.
        q, k = self.rope(q), self.rope(k)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask="causal")
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = Linear(d, f, b)
        self.up_proj = Linear(d, f, b)
        self.down_proj = Linear(f, d, b)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, h: mx.array) -> mx.array:
        h = h + self.self_attn(self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: mx.array) -> tuple[mx.array, list[mx.array]]:
        """Logits and the residual stream after each decoder layer (before the final norm)."""
        h = self.model.embed_tokens(input_ids)
        hidden = []
        for layer in self.model.layers:
            h = layer(h)
            hidden.append(h)
        h = self.model.norm(h)
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(h)
        else:
            logits = self.lm_head(h)
        return logits, hidden

    def __call__(self, input_ids: mx.array) -> mx.array:
        return self.forward(input_ids)[0]

    def add_lora(self, layers: int, rank: int, scale: float) -> list[str]:
        """Adapt q/k/v/o of the last `layers` layers; returns the adapter parameter names."""
        n = len(self.model.layers)
        if not 1 <= layers <= n:
            raise ValueError(f"lora.layers must be in 1..{n}, got {layers}")
        names = []
        for i in range(n - layers, n):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(self.model.layers[i].self_attn, proj).add_lora(rank, scale)
                names += [f"model.layers.{i}.self_attn.{proj}.lora_a", f"model.layers.{i}.self_attn.{proj}.lora_b"]
        return names
