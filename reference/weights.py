"""Checkpoint names → parameters, and strict loading of Hugging Face safetensors (single or sharded).

The name map is the one place that knows checkpoint naming. Loading is strict by default: a key that
fills no parameter, a parameter no key fills, a shape mismatch or a tensor that is not floating point is an
error listing all of them, so no parameter can silently keep its random initialisation. bfloat16 and
float16 checkpoints (the usual dtypes of released models) load into the float32 parameters exactly: the
float32 master weights mixed-precision training keeps.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .config import ModelConfig

IGNORED_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class WeightLoadError(ValueError):
    """The checkpoint does not fill the model exactly; `report` says how."""

    def __init__(self, report: LoadReport, source: Path):
        self.report = report
        super().__init__(f"{source}: checkpoint does not match the model:\n{report.describe()}")


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)  # parameters no checkpoint key fills
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys that fill no parameter
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint (4, 8) float16, model (8, 4) float32"
    ignored: list[str] = field(default_factory=list)  # rotary buffers

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        lines = []
        for title, items in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mismatched", self.mismatched),
        ):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        return "\n".join(lines) or "  all keys matched"

    def to_dict(self) -> dict:
        return {
            "missing": self.missing,
            "unexpected": self.unexpected,
            "mismatched": self.mismatched,
            "ignored": self.ignored,
        }


def name_map(cfg: ModelConfig) -> dict[str, str]:
    """Checkpoint key → model parameter path, for every parameter a checkpoint must provide."""
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        keys.append("lm_head.weight")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            keys.append(p + f"self_attn.{proj}.weight")
            if cfg.o_bias if proj == "o_proj" else cfg.qkv_bias:
                keys.append(p + f"self_attn.{proj}.bias")
        if cfg.qk_norm:
            keys += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            keys.append(p + f"mlp.{proj}.weight")
            if cfg.mlp_bias:
                keys.append(p + f"mlp.{proj}.bias")
        keys += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    # Our module tree is named like the checkpoint, so the map is the identity on the keys it lists;
    # it is still the single list of what a checkpoint must contain.
    return {k: k for k in keys}


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: `model.safetensors` or the shards of its index."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid shard index: {e}") from None
        files = sorted({path / f for f in weight_map.values()})
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise FileNotFoundError(f"{index} names shards that are not there: {', '.join(absent)}")
        return files
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def read_checkpoint(path: Path) -> dict[str, mx.array]:
    """Every tensor of a checkpoint folder, by key; a corrupt or truncated file is a clear error."""
    tensors: dict[str, mx.array] = {}
    for f in checkpoint_files(path):
        try:
            part = mx.load(str(f), format="safetensors")
        except Exception as e:  # MLX raises RuntimeError/ValueError with a terse message
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
        dup = set(part) & set(tensors)
        if dup:
            raise ValueError(f"{f}: keys also present in another shard: {sorted(dup)}")
        tensors.update(part)
    return tensors


def match(
    model_params: dict[str, mx.array], tensors: dict[str, mx.array], cfg: ModelConfig
) -> tuple[dict[str, mx.array], LoadReport]:
    """Pair checkpoint tensors with model parameters through the name map; report every problem."""
    nmap = name_map(cfg)
    report = LoadReport()
    loaded: dict[str, mx.array] = {}
    for key in sorted(tensors):
        if IGNORED_KEYS.search(key):
            report.ignored.append(key)
            continue
        target = nmap.get(key)
        if target is None or target not in model_params:
            report.unexpected.append(key)
            continue
        t, p = tensors[key], model_params[target]
        if t.shape != p.shape or not (mx.issubdtype(t.dtype, mx.floating) and mx.issubdtype(p.dtype, mx.floating)):
            report.mismatched.append(
                f"{key}: checkpoint {tuple(t.shape)} {t.dtype}, model {tuple(p.shape)} {p.dtype}".replace(
                    "mlx.core.", ""
                )
            )
            continue
        loaded[target] = t if t.dtype == p.dtype else t.astype(p.dtype)
    report.missing = sorted(
        set(nmap.values()) - set(loaded) - {k for k in nmap if any(m.startswith(k + ":") for m in report.mismatched)}
    )
    return loaded, report


def load_weights(model, path: str | Path, strict: bool = True) -> LoadReport:
    """Fill `model` from a checkpoint folder. Strict: raise WeightLoadError unless every key matches."""
    path = Path(path)
    tensors = read_checkpoint(path)
    params = dict(tree_flatten(model.parameters()))
    loaded, report = match(params, tensors, model.config)
    if strict and not report.ok:
        raise WeightLoadError(report, path)
    model.update(tree_unflatten(list(loaded.items())))
    mx.eval(model.parameters())
    return report
