"""Tokenizers (a checkpoint's own tokenizer.json, or bytes for the built-in default model) and JSONL
batches of text with provenance (auth_weight, prov_entropy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .loss import AUTH_WEIGHT_MAX

PAD, BOS, EOS = 0, 1, 2
OFFSET = 3
VOCAB_SIZE = 256 + OFFSET
DEFAULT_DATA = Path(__file__).parent / "data" / "default.jsonl"


def encode(text: str) -> list[int]:
    return [BOS] + [b + OFFSET for b in text.encode("utf-8")] + [EOS]


def decode(ids) -> str:
    return bytes(i - OFFSET for i in ids if i >= OFFSET).decode("utf-8", errors="replace")


class ByteTokenizer:
    """UTF-8 bytes shifted past PAD/BOS/EOS: the built-in default model's vocabulary, nobody else's."""

    name, vocab_size, pad_id = "bytes", VOCAB_SIZE, PAD

    def encode(self, text: str) -> list[int]:
        return encode(text)


class FileTokenizer:
    """A checkpoint's own tokenizer.json through the `tokenizers` library: the ids transformers' fast
    tokenizer gives for the same text (its special-token template included)."""

    name = "tokenizer.json"

    def __init__(self, path: Path, pad_id: int):
        from tokenizers import Tokenizer

        self.path, self.pad_id = path, pad_id
        self._tokenizer = Tokenizer.from_file(str(path))
        self.vocab_size = self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids


def tokenizer_for(checkpoint: Path | None) -> ByteTokenizer | FileTokenizer:
    """The tokenizer a checkpoint's model reads text with: its tokenizer.json, or bytes for the built-in
    default model (checkpoints that `parity train` saved say which in trainer.json)."""
    if checkpoint is None:
        return ByteTokenizer()
    checkpoint = Path(checkpoint)
    meta = checkpoint / "trainer.json"
    if meta.exists() and json.loads(meta.read_text()).get("tokenizer") == ByteTokenizer.name:
        return ByteTokenizer()
    if (checkpoint / "tokenizer.json").exists():
        cfg = json.loads((checkpoint / "config.json").read_text()) if (checkpoint / "config.json").exists() else {}
        pad = next(
            (cfg[k] for k in ("pad_token_id", "eos_token_id") if isinstance(cfg.get(k), int)), 0
        )  # padding is masked: any id in the vocabulary
        return FileTokenizer(checkpoint / "tokenizer.json", pad)
    raise ValueError(
        f"{checkpoint} has no tokenizer.json, so text cannot become this model's token ids: copy the "
        "checkpoint's tokenizer.json next to its config.json (the byte tokenizer is only for the built-in default model)"
    )


def read_jsonl(path: Path) -> list[dict]:
    """Records with `text`, `auth_weight` in [0, 0.99] and `prov_entropy` >= 0; errors name the line."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                text, w, h = r["text"], float(r["auth_weight"]), float(r["prov_entropy"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{n}: need a JSON object with text, auth_weight, prov_entropy ({e})") from None
            if not (isinstance(text, str) and text):
                raise ValueError(f"{path}:{n}: text must be a non-empty string")
            if not 0.0 <= w <= AUTH_WEIGHT_MAX:
                raise ValueError(f"{path}:{n}: auth_weight {w} outside [0, {AUTH_WEIGHT_MAX}]")
            if not (np.isfinite(h) and h >= 0):
                raise ValueError(f"{path}:{n}: prov_entropy {h} must be finite and >= 0")
            rows.append({"text": text, "auth_weight": w, "prov_entropy": h})
    if not rows:
        raise ValueError(f"{path}: no records")
    return rows


def make_batch(
    rows: list[dict], seq_len: int, tokenizer: ByteTokenizer | FileTokenizer | None = None
) -> dict[str, np.ndarray]:
    """Tokenise, truncate to seq_len, right-pad."""
    tokenizer = tokenizer or ByteTokenizer()
    B = len(rows)
    ids = np.full((B, seq_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((B, seq_len), np.int32)
    for i, r in enumerate(rows):
        toks = tokenizer.encode(r["text"])[:seq_len]
        ids[i, : len(toks)] = toks
        mask[i, : len(toks)] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "auth_weight": np.array([r["auth_weight"] for r in rows], np.float32),
        "prov_entropy": np.array([r["prov_entropy"] for r in rows], np.float32),
    }


def batch_for_step(
    rows: list[dict],
    step: int,
    batch_size: int,
    seq_len: int,
    seed: int,
    tokenizer: ByteTokenizer | FileTokenizer | None = None,
) -> dict[str, np.ndarray]:
    """The batch of update `step`: epochs over a seeded permutation, so a resumed run sees the same data."""
    per_epoch = max(1, len(rows) // batch_size)
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(rows))
    picked = [rows[i] for i in order[k * batch_size : (k + 1) * batch_size]]
    if len(picked) < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(rows)} records")
    return make_batch(picked, seq_len, tokenizer)
