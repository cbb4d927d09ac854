"""Fixtures from a user's own checkpoint (`parity fixtures create`).

The checkpoint is cut down where it costs nothing in shape: the first N layers (each with its real
widths, heads and weights) and V rows of the vocabulary (every token the batch uses, then the lowest
other ids), renumbered in their original order; the text goes through the checkpoint's own tokenizer
before the renumbering. The goldens are built like the bundled ones and the fixture is written only when the torch
twin and transformers agree with them; it is hashed into the fixture folder's own manifest, so `parity
audit --fixtures-dir DIR` checks and audits it like a bundled one. With `link` the cut weights stay out
of the fixture (harness/linked_checkpoint.py): real layers of a large model are too big to store or share.
`parity audit --checkpoint DIR --data FILE` builds the same fixture in a temporary folder for one audit
(`live_case`) and keeps nothing.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from .case import Case
from .fixtures import (
    MANIFEST,
    MANIFEST_VERSIONS,
    FixtureError,
    build_goldens,
    fixture_files,
    lora_adapters,
    platform_key,
)
from .linked_checkpoint import write_link
from .machine import versions
from .protocol.tensors import save_tensors
from .tolerances import TOLERANCES

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
DEFAULT_BATCH = 4  # rows when --batch-size is not given (fewer if the data has fewer)
DTYPES = ("float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# LoRA on every kept layer: goldens stay small (the adapters' gradients, not the model's) whatever the model.
DEFAULT_SETTINGS = {
    "trainable": "lora",
    "lora": {"rank": 8, "scale": 2.0},
    "optimizer": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "bias_correction": True},
    "schedule": {"kind": "constant"},
    "clip_norm": 1.0,
    "accum_steps": 1,
    "loss": {"alpha": 2.7, "lambda": 1.0},
    "steps": 3,
    "checkpoint_at": 1,
}


def read_config(src: Path) -> dict:
    from mlx_parity.reference.config import ConfigError, ModelConfig

    if not (src / "config.json").exists():
        raise FixtureError(f"{src}: no config.json (a Hugging Face checkpoint folder is needed)")
    cfg = json.loads((src / "config.json").read_text())
    try:
        ModelConfig.from_dict(cfg)  # an unsupported family or key is refused before any work
    except ConfigError as e:
        raise FixtureError(f"{src}: {e}") from None
    return cfg


def kept_tokens(b: dict[str, np.ndarray], vocab: int | None, V: int) -> np.ndarray | None:
    """The vocabulary rows kept: every id the batch uses, then the lowest others, `vocab` in all, sorted."""
    if vocab is None or vocab == V:
        return None
    used = np.unique(b["input_ids"][b["attention_mask"].astype(bool)])
    if not len(used) <= vocab <= V:
        raise FixtureError(
            f"--vocab {vocab}: the batch uses {len(used)} distinct tokens and the checkpoint has {V}; "
            f"give a value between them"
        )
    others = np.setdiff1d(np.arange(min(V, vocab + len(used))), used)[: vocab - len(used)]
    return np.sort(np.concatenate([used, others])).astype(np.int64)


def renumber(b: dict[str, np.ndarray], kept: np.ndarray | None) -> dict[str, np.ndarray]:
    if kept is None:
        return b
    mask = b["attention_mask"].astype(bool)
    ids = np.where(mask, np.searchsorted(kept, b["input_ids"]), 0).astype(np.int32)  # padding: any id, masked out
    return b | {"input_ids": ids}


def stored_dtypes(files) -> list[str]:
    """The dtypes of a checkpoint's tensors, from the files' headers (no tensor is read)."""
    from safetensors import safe_open

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

    from mlx_parity.reference.weights import checkpoint_files

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


def batch(
    checkpoint: Path, text: Path | None, token_ids: Path | None, batch_size: int | None, seq_len: int, V: int, seed: int
) -> dict[str, np.ndarray]:
    """B rows of `seq_len` tokens: the first records of `text` through the checkpoint's own tokenizer, or
    given token ids (a JSON list of lists, or .npy); right-padded, with provenance from the records or seeded."""
    from mlx_parity.reference.data import make_batch, read_jsonl, tokenizer_for

    rng = np.random.default_rng([seed, 3])
    if (text is None) == (token_ids is None):
        raise FixtureError("give exactly one of --text (JSONL records or plain lines) and --token-ids")
    if text is not None:
        if text.suffix == ".jsonl":
            rows = read_jsonl(text)
        else:
            rows = [
                {"text": line, "auth_weight": float(rng.uniform(0, 0.99)), "prov_entropy": float(rng.uniform(0, 3))}
                for line in text.read_text().splitlines()
                if line.strip()
            ]
        batch_size = batch_size or min(DEFAULT_BATCH, len(rows))
        if len(rows) < batch_size:
            raise FixtureError(f"{text}: {len(rows)} records, fewer than --batch-size {batch_size}")
        try:
            tok = tokenizer_for(checkpoint)
        except ValueError as e:
            raise FixtureError(f"{e}; or give --token-ids") from None
        if tok.pad_id is None or tok.pad_id >= V:
            tok.pad_id = 0  # padding is masked out: any id of the vocabulary
        b = make_batch(rows[:batch_size], seq_len, tok)
    else:
        ids = np.load(token_ids) if token_ids.suffix == ".npy" else json.loads(token_ids.read_text())
        rows = [list(map(int, r)) for r in ids]
        batch_size = batch_size or min(DEFAULT_BATCH, len(rows))
        rows = rows[:batch_size]
        if len(rows) < batch_size:
            raise FixtureError(f"{token_ids}: {len(rows)} rows, fewer than --batch-size {batch_size}")
        b = {
            "input_ids": np.zeros((batch_size, seq_len), np.int32),
            "attention_mask": np.zeros((batch_size, seq_len), np.int32),
        }
        for i, r in enumerate(rows):
            r = r[:seq_len]
            b["input_ids"][i, : len(r)], b["attention_mask"][i, : len(r)] = r, 1
        b["auth_weight"] = rng.uniform(0.0, 0.99, batch_size).astype(np.float32)
        b["prov_entropy"] = rng.uniform(0.0, 3.0, batch_size).astype(np.float32)
    real = b["input_ids"][b["attention_mask"].astype(bool)]
    if real.size and (real.max() >= V or real.min() < 0):
        raise FixtureError(
            f"token id {int(real.max() if real.max() >= V else real.min())} is outside the vocabulary of {V}"
        )
    if (b["attention_mask"].sum(axis=1) < 2).any():
        raise FixtureError("every row needs at least 2 tokens (one next-token target)")
    return b


def settings_for(path: Path | None, layers: int) -> dict:
    """DEFAULT_SETTINGS (LoRA on every kept layer) with the file's keys over them, one level deep, validated."""
    from mlx_parity.reference.settings import SettingsError, TrainSettings

    s = json.loads(json.dumps(DEFAULT_SETTINGS))
    s["lora"]["layers"] = layers
    if path is not None:
        try:
            given = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FixtureError(f"--settings {path}: {e}") from None
        for k, v in given.items():
            s[k] = {**s[k], **v} if isinstance(v, dict) and isinstance(s.get(k), dict) else v
    try:
        TrainSettings.from_dict(s)
    except (SettingsError, ValueError, TypeError) as e:
        raise FixtureError(f"settings: {e}") from None
    return s


def add_to_manifest(root: Path, name: str, source: dict) -> None:
    """The folder's own manifest: this fixture's files by sha256, beside any fixtures already listed."""
    path = root / MANIFEST
    manifest = (
        json.loads(path.read_text())
        if path.exists()
        else {
            "format": "mlx-parity-fixtures/2",
            "versions": versions(*MANIFEST_VERSIONS, imported=True),
            "platform": platform_key(),
            "tolerances": {f"{dtype}/{stage}": t.describe() for (dtype, stage), t in TOLERANCES.items()},
            "fixtures": {},
        }
    )
    if manifest.get("platform") != platform_key():
        raise FixtureError(
            f"{path} was written on {manifest.get('platform')}, this is {platform_key()}: use another --fixtures-dir"
        )
    manifest["fixtures"][name] = {
        "seed": source["seed"],
        "exposes": [],
        "source": source,
        "files": fixture_files(root / name),
    }
    tmp = path.with_name(MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def create(
    name: str,
    checkpoint: Path,
    root: Path,
    *,
    layers: int | None = None,
    vocab: int | None = None,
    text: Path | None = None,
    token_ids: Path | None = None,
    settings: Path | None = None,
    batch_size: int | None = None,
    seq_len: int = 32,
    dtype: str | None = None,
    seed: int = 0,
    force: bool = False,
    progress=None,
    require_agreement: bool = True,
    link: bool = False,
    live: bool = False,
) -> Path:
    """Build the fixture in a staging folder and move it into `root` only once every framework agreed (with
    `require_agreement`; without, the margins are only recorded and the folder's manifest is left alone).
    `link`: the cut weights stay out of the fixture, which records the source and their hashes instead.
    `live` (one audit, then deleted): an uncut checkpoint is linked, not copied, and of the agreement checks only
    transformers' forward runs (the audit itself judges the backends asked for)."""
    from mlx_parity.reference.blas import reference_blas

    from .case import FIXTURES_DIR

    say = progress or (lambda what: None)
    if not NAME.match(name):
        raise FixtureError(f"fixture name {name!r}: lowercase letters, digits, '_' and '-'")
    root = Path(root).resolve()
    if require_agreement and root == FIXTURES_DIR.resolve():
        raise FixtureError("the bundled fixtures are built by `parity fixtures generate`: give another --fixtures-dir")
    if (root / name).exists() and not force:
        raise FixtureError(f"{root / name} exists: use --force to replace it")
    checkpoint = Path(checkpoint)
    V = int(read_config(checkpoint)["vocab_size"])
    b = batch(checkpoint, text, token_ids, batch_size, seq_len, V, seed)
    kept = kept_tokens(b, vocab, V)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=root) as tmp:
        staging = Path(tmp) / name
        say(f"slicing {checkpoint}")
        cut = Path(tmp) / "cut" if link else staging / "checkpoint"
        source = slice_checkpoint(checkpoint, cut, layers, kept, dtype, share_uncut=live)
        if link:
            staging.mkdir()
            cut = write_link(
                staging,
                cut,
                {
                    "source": source["checkpoint"],
                    "layers": source["layers"][0],
                    "kept_token_ids": source["kept_token_ids"],
                    "dtype": dtype,
                },
            )
        source |= {"seed": seed, "batch_size": int(b["input_ids"].shape[0]), "seq_len": seq_len}
        kept_layers, kept_vocab = source["layers"][0], source["vocab"][0]
        save_tensors(renumber(b, kept), str(staging / "batch.safetensors"))
        s = settings_for(settings, kept_layers)
        (staging / "settings.json").write_text(json.dumps(s, indent=2, sort_keys=True) + "\n")
        if s["trainable"] == "lora":
            cfg = json.loads((cut / "config.json").read_text())
            save_tensors(
                lora_adapters(cfg, s["lora"], np.random.default_rng([seed, 2])), str(staging / "lora_init.safetensors")
            )
        (staging / "case.json").write_text(
            json.dumps(
                {
                    "name": name,
                    "seed": seed,
                    "exposes": [],
                    "source": source,
                    "description": f"from {Path(checkpoint).name}: the first {kept_layers} of {source['layers'][1]} layers, "
                    f"{kept_vocab} of {source['vocab'][1]} tokens, {source['dtype']}",
                },
                indent=2,
            )
            + "\n"
        )
        # Stored goldens are reproducible on any CPU of this platform, as the bundled ones; live ones are used
        # once, on this CPU, and computed with its fast BLAS (the reference BLAS takes minutes on a 135M model).
        with nullcontext() if live else reference_blas():
            build_goldens(Case(staging), require_agreement=require_agreement, progress=say, audit_backends=not live)
        target = root / name
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging), str(target))
    if require_agreement:
        add_to_manifest(root, name, source)
    return target


@contextmanager
def live_case(checkpoint: Path, *, text: Path | None = None, token_ids: Path | None = None, progress=None, **options):
    """Goldens computed now, for one audit, and deleted after it (`parity audit --checkpoint`): the same
    fixture `create` writes, in a temporary folder, linked to the checkpoint when nothing is cut.
    Transformers' forward is measured against the float64 truth and said, not required; the audit then
    judges the backends asked for, the twin included."""
    with tempfile.TemporaryDirectory(prefix="parity-live-") as tmp:
        path = create(
            "live",
            checkpoint,
            Path(tmp),
            text=text,
            token_ids=token_ids,
            progress=progress,
            require_agreement=False,
            live=True,
            **options,
        )
        yield Case(path)
