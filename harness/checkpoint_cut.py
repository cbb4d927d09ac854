"""Cutting a Hugging Face checkpoint down: its first N layers and V vocabulary rows, in a chosen dtype.
Fixture creation cuts a user's checkpoint once; a linked fixture (harness/linked_checkpoint.py) re-makes
its cut from the source whenever its cache is gone."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
from safetensors import safe_open

from mlx_parity.reference.config import ConfigError, ModelConfig
from mlx_parity.reference.weights import checkpoint_files

from .errors import FixtureError

DTYPES = ("float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def read_config(src: Path) -> dict:
    if not (src / "config.json").exists():
        raise FixtureError(f"{src}: no config.json (a Hugging Face checkpoint folder is needed)")
    cfg = json.loads((src / "config.json").read_text())
    try:
        ModelConfig.from_dict(cfg)  # an unsupported family or key is refused before any work
    except ConfigError as e:
        raise FixtureError(f"{src}: {e}") from None
    return cfg


def stored_dtypes(files) -> list[str]:
    """The dtypes of a checkpoint's tensors, from the files' headers (no tensor is read)."""
    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    found = set()
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            found |= {names.get(d, d.lower()) for d in (st.get_slice(k).get_dtype() for k in st.keys())}
    return sorted(found)


def slice_checkpoint(
    src: Path, dst: Path, layers: int | None, kept: np.ndarray | None, dtype: str | None, share_uncut: bool = False
) -> dict:
    """The first `layers` decoder layers and the `kept` vocabulary rows of `src`, read tensor by tensor (MLX
    loads lazily: a large checkpoint is never in memory whole), stored in `dtype` (default: as stored).
    `share_uncut`: when nothing is cut, `dst` is a link to `src` (a live audit of a whole model copies nothing)."""
    import mlx.core as mx

    cfg = read_config(src)
    L, V = int(cfg["num_hidden_layers"]), int(cfg["vocab_size"])
    layers = layers or L
    vocab = V if kept is None else len(kept)
    if not 1 <= layers <= L:
        raise FixtureError(f"--layers {layers}: the checkpoint has {L} layers")
    if dtype is not None and dtype not in DTYPES:
        raise FixtureError(f"--dtype {dtype}: one of {', '.join(DTYPES)}")
    if share_uncut and layers == L and kept is None and dtype is None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src.resolve(), target_is_directory=True)
        return {
            "checkpoint": str(src.resolve()),
            "layers": [L, L],
            "vocab": [V, V],
            "kept_token_ids": None,
            "stored_dtype": stored_dtypes(checkpoint_files(src)),
            "dtype": "as stored",
        }
    tensors, stored = {}, set()
    layer_key = re.compile(r"^model\.layers\.(\d+)\.")
    for f in checkpoint_files(src):
        for key, t in mx.load(str(f), format="safetensors").items():
            m = layer_key.match(key)
            if m and int(m.group(1)) >= layers:
                continue
            stored.add(str(t.dtype).removeprefix("mlx.core."))
            if key in ("model.embed_tokens.weight", "lm_head.weight") and kept is not None:
                t = mx.take(t, mx.array(kept.astype(np.int32)), axis=0)
            tensors[key] = t.astype(getattr(mx, dtype)) if dtype and mx.issubdtype(t.dtype, mx.floating) else t
    dst.mkdir(parents=True)
    mx.save_safetensors(str(dst / "model.safetensors"), tensors, metadata={"format": "pt"})
    cfg.update(num_hidden_layers=layers, vocab_size=vocab)
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = cfg["layer_types"][:layers]
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):  # renumbered, or gone with the rows not kept
        if kept is not None and isinstance(cfg.get(k), int):
            i = int(np.searchsorted(kept, cfg[k]))
            cfg[k] = i if i < len(kept) and kept[i] == cfg[k] else None
    if dtype:
        cfg["dtype"] = dtype
    (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES if kept is None else ():  # renumbered ids are no longer the tokenizer's
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return {
        "checkpoint": str(src.resolve()),
        "layers": [layers, L],
        "vocab": [vocab, V],
        "kept_token_ids": None if kept is None else kept.tolist(),
        "stored_dtype": sorted(stored),
        "dtype": dtype or "as stored",
    }
