"""Model configuration read from a Hugging Face `config.json`, with Hugging Face's defaults."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


class ConfigError(ValueError):
    """A config.json this trainer cannot represent faithfully."""


FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # one architecture: config keys, biases, and Qwen3's q/k norms
ROPE_SCALING = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6  # LlamaConfig's default (MLX's RMSNorm default is 1e-5)
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False  # LlamaConfig's default (mlx-lm's is True)
    qkv_bias: bool = False  # q/k/v projections (Llama: attention_bias; Qwen2: always)
    o_bias: bool = False  # o_proj (Llama: attention_bias; Qwen2: never)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: an RMSNorm over head_dim on each query and key head, before RoPE
    model_type: str = "llama"
    rope_type: str = "default"
    rope_scaling: tuple[tuple[str, float], ...] = ()  # the parameters ROPE_SCALING names for rope_type

    @property
    def n_rep(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def rope_inv_freq(self) -> np.ndarray:
        """RoPE's angle per position for each rotated pair, float64 (transformers' rope init functions)."""
        inv = self.rope_theta ** (-np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        p = dict(self.rope_scaling)
        if self.rope_type == "linear":
            return inv / p["factor"]
        if self.rope_type == "llama3":
            factor, low, high, ctx = (
                p["factor"],
                p["low_freq_factor"],
                p["high_freq_factor"],
                p["original_max_position_embeddings"],
            )
            wavelen = 2 * np.pi / inv
            scaled = np.where(wavelen > ctx / low, inv / factor, inv)  # long wavelengths slowed by the factor
            smooth = (ctx / wavelen - low) / (high - low)
            medium = (wavelen >= ctx / high) & (wavelen <= ctx / low)  # between the two: interpolated
            return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
        return inv

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        model_type = d.get("model_type", "llama")
        if model_type not in FAMILIES:
            raise ConfigError(f"model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
        if model_type == "mistral" and d.get("sliding_window") is not None:
            raise ConfigError(
                f"sliding_window={d['sliding_window']!r}: sliding-window attention is not supported (only sliding_window null)"
            )
        if model_type in ("qwen2", "qwen3") and d.get("use_sliding_window"):
            raise ConfigError("use_sliding_window=true: sliding-window attention is not supported")
        sliding = [t for t in d.get("layer_types") or () if t != "full_attention"]
        if sliding:
            raise ConfigError(f"layer_types has {sliding[0]!r} layers: only full_attention is supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
        # transformers 5 keeps RoPE in rope_parameters; transformers 4 wrote rope_theta and rope_scaling at the top level
        rope = {**(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_SCALING:
            raise ConfigError(f"rope_type {rope_type!r} is not supported (supported: {', '.join(ROPE_SCALING)})")
        missing = [k for k in ROPE_SCALING[rope_type] if k not in rope]
        if missing:
            raise ConfigError(f"rope_type {rope_type!r} needs {missing[0]!r} in rope_parameters (or rope_scaling)")
        qwen2, qwen3 = model_type == "qwen2", model_type == "qwen3"
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            cfg = cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                qkv_bias=True if qwen2 else bool(d.get("attention_bias", False)),
                o_bias=False if qwen2 else bool(d.get("attention_bias", False)),
                mlp_bias=False if qwen2 or qwen3 else bool(d.get("mlp_bias", False)),
                qk_norm=qwen3,
                model_type=model_type,
                rope_type=rope_type,
                rope_scaling=tuple((k, float(rope[k])) for k in ROPE_SCALING[rope_type]),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the required key {e.args[0]!r}") from None
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={cfg.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={cfg.num_key_value_heads}"
            )
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None

    def to_hf_dict(self) -> dict:
        """The config as transformers 5 writes it, so a checkpoint we save loads in transformers."""
        d = {
            k: v
            for k, v in asdict(self).items()
            if k not in ("qkv_bias", "o_bias", "qk_norm", "rope_theta", "rope_type", "rope_scaling")
        }
        arch = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
        }[self.model_type]
        scaling = {
            k: int(v) if k == "original_max_position_embeddings" else v for k, v in self.rope_scaling
        }  # transformers wants a count
        d.update(
            architectures=[arch],
            hidden_act="silu",
            rope_parameters={"rope_type": self.rope_type, "rope_theta": self.rope_theta, **scaling},
        )
        if self.model_type != "qwen2":
            d["attention_bias"] = self.qkv_bias
        if self.model_type == "mistral":
            d["sliding_window"] = None  # MistralConfig's default is a window of 4096
        return d
