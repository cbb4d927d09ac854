"""What the bench times: the backends, the three model sizes, the step's settings, and each size's
checkpoint and batch, shared by the suites in `bench/` and the session that starts them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_parity.reference.config import ModelConfig
from mlx_parity.reference.data import OFFSET, VOCAB_SIZE
from mlx_parity.reference.train_cli import init_checkpoint

BACKENDS = ("mlx", "torch", "mlx-rs")
BATCH = 4
SETTINGS = {
    "trainable": "full",
    "optimizer": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "bias_correction": True},
    "schedule": {"kind": "constant"},
    "clip_norm": 1.0,
    "accum_steps": 1,
}


@dataclass(frozen=True)
class Size:
    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    seq_len: int

    def config(self) -> ModelConfig:
        return ModelConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        )

    @property
    def tokens(self) -> int:
        return BATCH * self.seq_len


SIZES = {
    "1M": Size("1M", hidden=128, layers=6, intermediate=352, heads=4, kv_heads=2, head_dim=32, seq_len=128),
    "5M": Size("5M", hidden=256, layers=8, intermediate=544, heads=4, kv_heads=2, head_dim=64, seq_len=128),
    "20M": Size("20M", hidden=512, layers=8, intermediate=1088, heads=8, kv_heads=4, head_dim=64, seq_len=256),
}


def param_count(size: Size) -> int:
    c = size.config()
    d, hd = c.hidden_size, c.head_dim
    attn = d * c.num_attention_heads * hd * 2 + d * c.num_key_value_heads * hd * 2
    layer = attn + 3 * d * c.intermediate_size + 2 * d
    return 2 * c.vocab_size * d + d + c.num_hidden_layers * layer


def make_batch(size: Size, seed: int = 0) -> dict[str, np.ndarray]:
    """A full batch (no padding) of random byte tokens with provenance values in range."""
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(OFFSET, VOCAB_SIZE, size=(BATCH, size.seq_len), dtype=np.int32),
        "attention_mask": np.ones((BATCH, size.seq_len), np.int32),
        "auth_weight": rng.uniform(0.0, 0.9, BATCH).astype(np.float32),
        "prov_entropy": rng.uniform(0.0, 3.0, BATCH).astype(np.float32),
    }


def ensure_checkpoint(size: Size, root: Path) -> Path:
    """The size's initial Hugging Face checkpoint under `root` (built once, seed 0)."""
    out = root / f"llama-{size.name}"
    if not (out / "config.json").exists():
        init_checkpoint(size.config(), out, seed=0)
    return out
