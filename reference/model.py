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
            # float32 adapters on a bfloat16 model: their path runs in float32, its sum in the model's dtype
            y = y + (self.lora_scale * ((x @ self.lora_a) @ self.lora_b)).astype(y.dtype)
        return y


class ScaledRoPE(nn.Module):
    """RoPE with the config's scaled frequencies (linear, llama3): MLX's fused rope given the periods."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dims = cfg.head_dim
        self._periods = mx.array(1.0 / cfg.rope_inv_freq(), dtype=mx.float32)  # private: not a parameter

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._periods)


class Attention(nn.Module):
    """Causal self-attention in the pieces the isolated checks judge one by one (`pieces.py` names them):
    project, rotate, score, weigh, mix. Written out rather than fused, so each piece is a value."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, b = cfg.hidden_size, cfg.qkv_bias
        self.q_proj = Linear(d, self.n_heads * self.head_dim, b)
        self.k_proj = Linear(d, self.n_kv * self.head_dim, b)
        self.v_proj = Linear(d, self.n_kv * self.head_dim, b)
        self.o_proj = Linear(self.n_heads * self.head_dim, d, cfg.o_bias)
        if cfg.qk_norm:  # Qwen3
            self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        # RoPE reads positions from axis -2, hence [B, H, T, D]; it rotates the halves (HF's rotate_half).
        self.rope = (
            nn.RoPE(self.head_dim, traditional=False, base=cfg.rope_theta)
            if cfg.rope_type == "default"
            else ScaledRoPE(cfg)
        )
        self.scale = self.head_dim**-0.5

    def _heads(self, y: mx.array, n: int) -> mx.array:
        B, T, _ = y.shape
        return y.reshape(B, T, n, self.head_dim).transpose(0, 2, 1, 3)

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """q [B, H, T, D], k and v [B, K, T, D]; with Qwen3's norms q and k are each head normed (over D)."""
        q, k = self._heads(self.q_proj(x), self.n_heads), self._heads(self.k_proj(x), self.n_kv)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, self._heads(self.v_proj(x), self.n_kv)

    def kv_for_queries(self, kv: mx.array) -> mx.array:
        """Query head h reads kv head h // (H / K): each kv head repeated, not the heads tiled."""
        return mx.repeat(kv, self.n_heads // self.n_kv, axis=1)

    def scores(self, q: mx.array, k: mx.array) -> mx.array:
        """scale · q kᵀ, [B, H, T, T], before the mask."""
        return (q * self.scale) @ self.kv_for_queries(k).transpose(0, 1, 3, 2)

    def probs(self, scores: mx.array) -> mx.array:
        """Softmax over keys with the causal mask: query t sees keys 0..t."""
        T = scores.shape[-1]
        causal = mx.arange(T)[None, :] <= mx.arange(T)[:, None]
        return mx.softmax(mx.where(causal, scores, -mx.inf), axis=-1)

    def mix(self, probs: mx.array, v: mx.array) -> mx.array:
        """The heads' weighted values, merged: [B, T, H·D], the input of o_proj."""
        o = probs @ self.kv_for_queries(v)
        B, _, T, _ = o.shape
        return o.transpose(0, 2, 1, 3).reshape(B, T, -1)

    def __call__(self, x: mx.array) -> mx.array:
        q, k, v = self.project(x)
        return self.o_proj(self.mix(self.probs(self.scores(self.rope(q), self.rope(k))), v))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = Linear(d, f, b)
        self.up_proj = Linear(d, f, b)
        self.down_proj = Linear(f, d, b)

    @staticmethod
    def activation(gate: mx.array, up: mx.array) -> mx.array:
        return nn.silu(gate) * up

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.activation(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def pieces(self, h: mx.array, given: dict[str, mx.array] | None = None) -> dict[str, mx.array]:
        """Every piece of the layer (names in `harness/pieces.py`). Without `given`: the layer's own
        chain from `h`. With `given` (the reference's pieces): each piece from the given values of its
        inputs, and `output` the whole layer from `given["input"]`, so a bug stays in the piece it is in."""
        own = {"input": h}
        x = own if given is None else given
        a, m = self.self_attn, self.mlp
        own["input_norm"] = self.input_layernorm(x["input"])
        own["q"], own["k"], own["v"] = a.project(x["input_norm"])
        own["q_rope"], own["k_rope"] = a.rope(x["q"]), a.rope(x["k"])
        own["scores"] = a.scores(x["q_rope"], x["k_rope"])
        own["probs"] = a.probs(x["scores"])
        own["attn"] = a.mix(x["probs"], x["v"])
        own["o_proj"] = a.o_proj(x["attn"])
        own["post_norm"] = self.post_attention_layernorm(x["input"] + x["o_proj"])
        own["gate"], own["up"] = m.gate_proj(x["post_norm"]), m.up_proj(x["post_norm"])
        own["act"] = m.activation(x["gate"], x["up"])
        own["down"] = m.down_proj(x["act"])
        own["output"] = (x["input"] + x["o_proj"]) + x["down"] if given is None else self(given["input"])
        return own

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
        return self.head(self.model.norm(h)), hidden

    def head(self, x: mx.array) -> mx.array:
        """Logits of the final-normed residual: lm_head, or the embedding transposed when tied."""
        return self.model.embed_tokens.as_linear(x) if self.config.tie_word_embeddings else self.lm_head(x)

    def pieces(self, input_ids: mx.array, given: dict[str, mx.array] | None = None) -> dict[str, mx.array]:
        """The forward pass in its pieces (`embed`, `layer.{i}.<piece>`, `head.norm`, `head.logits`): the
        reference's own chain, or with `given` each piece from the given values of its inputs."""
        own = {"embed": self.model.embed_tokens(input_ids)}
        h = own["embed"]
        for i, layer in enumerate(self.model.layers):
            inputs = (
                None
                if given is None
                else {k.removeprefix(f"layer.{i}."): v for k, v in given.items() if k.startswith(f"layer.{i}.")}
            )
            if inputs is not None:
                inputs["input"] = given["embed"] if i == 0 else given[f"layer.{i - 1}.output"]
            own |= {f"layer.{i}.{k}": v for k, v in layer.pieces(h, inputs).items() if k != "input"}
            h = own[f"layer.{i}.output"]
        x = given if given is not None else own
        own["head.norm"] = self.model.norm(x[f"layer.{len(self.model.layers) - 1}.output"])
        own["head.logits"] = self.head(x["head.norm"])
        return own

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
