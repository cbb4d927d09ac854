"""The forward pass in pieces: each judged on the reference's own values of its inputs.

A piece's golden is the reference's value in its own forward chain; a backend computes every piece from
the goldens of the pieces it consumes (`CONSUMES`), so a bug in one piece cannot reach another: a wrong
RoPE base shows at `q_rope` alone, a wrong attention scale at `scores` alone, both at once each in its
own place. Names are `embed`, `layer.{i}.<piece>`, `head.norm`, `head.logits`; stored and compared under
`isolated.forward.`. Layouts: per-head values [B, heads, T, head_dim], scores and probabilities [B, H, T, T]
(query, key), the rest [B, T, features].
"""

from __future__ import annotations

import numpy as np

LAYER_PIECES = (
    "input_norm",
    "q",
    "k",
    "v",
    "q_rope",
    "k_rope",
    "scores",
    "probs",
    "attn",
    "o_proj",
    "post_norm",
    "gate",
    "up",
    "act",
    "down",
    "output",
)
# What each layer piece is computed from ("input" is the residual entering the layer).
CONSUMES = {
    "input_norm": ("input",),
    "q": ("input_norm",),
    "k": ("input_norm",),
    "v": ("input_norm",),
    "q_rope": ("q",),
    "k_rope": ("k",),
    "scores": ("q_rope", "k_rope"),
    "probs": ("scores",),
    "attn": ("probs", "v"),
    "o_proj": ("attn",),
    "post_norm": ("input", "o_proj"),
    "gate": ("post_norm",),
    "up": ("post_norm",),
    "act": ("gate", "up"),
    "down": ("act",),
    "output": ("input",),
}
PER_HEAD = {"q", "k", "v", "q_rope", "k_rope"}
PER_PAIR = {"scores", "probs"}
PREFIX = "isolated.forward."


def names(num_layers: int) -> list[str]:
    """Every piece, in the order the forward pass computes them."""
    return (
        ["embed"] + [f"layer.{i}.{p}" for i in range(num_layers) for p in LAYER_PIECES] + ["head.norm", "head.logits"]
    )


def num_layers(golden: dict) -> int:
    return len([k for k in golden if k.startswith(PREFIX + "layer.") and k.endswith(".output")])


def given(golden: dict) -> dict[str, np.ndarray]:
    """The goldens a backend computes the pieces from (what the protocol sends as inputs)."""
    return {k.removeprefix(PREFIX): v for k, v in golden.items() if k.startswith(PREFIX)}


def piece_of(name: str) -> str:
    """`isolated.forward.layer.1.q_rope` -> `q_rope`; `isolated.forward.head.logits` -> `head.logits`."""
    n = name.removeprefix(PREFIX)
    return n.split(".", 2)[2] if n.startswith("layer.") else n


def layer_of(name: str) -> int | None:
    n = name.removeprefix(PREFIX)
    return int(n.split(".")[1]) if n.startswith("layer.") else None


def real_tokens(name: str, attention_mask: np.ndarray) -> np.ndarray:
    """Where a piece is judged: at real tokens (a padded query's values never reach the loss)."""
    m = attention_mask.astype(bool)
    piece = piece_of(name)
    if piece in PER_PAIR:
        return m[:, None, :, None] & m[:, None, None, :]
    if piece in PER_HEAD:
        return m[:, None, :, None]
    return m[..., None]


_MODULES = {
    "input_norm": ("input_layernorm",),
    "q": ("self_attn.q_proj", "self_attn.q_norm"),
    "k": ("self_attn.k_proj", "self_attn.k_norm"),
    "v": ("self_attn.v_proj",),
    "o_proj": ("self_attn.o_proj",),
    "post_norm": ("post_attention_layernorm",),
    "gate": ("mlp.gate_proj",),
    "up": ("mlp.up_proj",),
    "down": ("mlp.down_proj",),
    "output": ("",),
}


def parameters(name: str) -> list[str]:
    """Prefixes of the parameters a piece reads: a piece whose parameters did not load is not its own finding."""
    piece, layer = piece_of(name), layer_of(name)
    if layer is not None:
        return [f"model.layers.{layer}." + m for m in _MODULES.get(piece, ())]
    return {
        "embed": ["model.embed_tokens."],
        "head.norm": ["model.norm."],
        "head.logits": ["model.embed_tokens.", "lm_head."],
    }.get(piece, [])  # a port may tie or not, whatever the config says
