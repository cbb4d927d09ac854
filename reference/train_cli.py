"""`parity train`: a plain training loop over the reference trainer, with progress and checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .config import ModelConfig
from .data import DEFAULT_DATA, VOCAB_SIZE, FileTokenizer, batch_for_step, read_jsonl, tokenizer_for
from .model import LlamaForCausalLM
from .settings import TrainSettings
from .trainer import Trainer

DEFAULT_MODEL = ModelConfig(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
DEFAULT_SETTINGS = {
    "trainable": "full",
    "optimizer": {"lr": 3e-3, "weight_decay": 0.01, "bias_correction": True},
    "schedule": {"kind": "warmup_cosine", "warmup_steps": 5, "warmup_init": 3e-4, "decay_steps": 55, "end_lr": 3e-4},
    "clip_norm": 1.0,
}


def init_checkpoint(cfg: ModelConfig, out: Path, seed: int) -> Path:
    """A freshly initialised model written as a Hugging Face checkpoint, so training starts from a file."""
    mx.random.seed(seed)
    model = LlamaForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(
        str(out / "model.safetensors"), dict(tree_flatten(model.parameters())), metadata={"format": "pt"}
    )
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    return out


def run_training(
    *,
    checkpoint,
    data,
    out: Path,
    settings_path,
    steps,
    batch_size,
    seq_len,
    save_every,
    resume,
    seed,
    console: Console,
):
    rows = read_jsonl(data or DEFAULT_DATA)
    if resume:
        trainer = Trainer.load_checkpoint(resume)
        tokenizer = tokenizer_for(resume)
        console.print(f"resumed from {resume} at update {trainer.optimizer_state()['step']}")
    else:
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} is not empty; choose another --out or --resume from a checkpoint in it")
        settings = TrainSettings.from_dict(
            json.loads(Path(settings_path).read_text()) if settings_path else DEFAULT_SETTINGS
        )
        tokenizer = tokenizer_for(checkpoint)  # before anything is written: a checkpoint without one stops here
        if checkpoint is None:
            checkpoint = init_checkpoint(DEFAULT_MODEL, out / "init", seed)
            console.print(
                f"tiny default model ({DEFAULT_MODEL.num_hidden_layers} layers, d={DEFAULT_MODEL.hidden_size}) written to {checkpoint}"
            )
        trainer, report = Trainer.from_pretrained(checkpoint, settings)
        if report.ignored:
            console.print(f"ignored checkpoint keys: {', '.join(report.ignored)}")
    vocab = trainer.model.config.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ValueError(
            f"the model's vocab_size {vocab} is smaller than its tokenizer's {tokenizer.vocab_size} ({tokenizer.name})"
        )
    console.print(
        f"tokenizer: {tokenizer.path if isinstance(tokenizer, FileTokenizer) else 'bytes (the built-in default model)'}"
    )
    start = trainer.optimizer_state()["step"]
    n_params = sum(v.size for v in trainer.parameters().values())
    console.print(
        f"training {len(trainer.trainable_names())} tensors ({trainer.settings.trainable}) of a {n_params:,}-parameter model "
        f"on {len(rows)} records, updates {start}..{steps}"
    )
    first = last = None
    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("ce {task.fields[ce]:.4f}  total {task.fields[loss]:.3f}"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("training", total=steps, completed=start, ce=float("nan"), loss=float("nan"))
        for step in range(start, steps):
            parts = trainer.step(batch_for_step(rows, step, batch_size, seq_len, seed, tokenizer))
            first = parts["ce"] if first is None else first
            last = parts["ce"]
            progress.update(task, advance=1, ce=parts["ce"], loss=parts["total"])
            if (step + 1) % save_every == 0 or step + 1 == steps:
                path = out / f"step-{step + 1:06d}"
                trainer.save_checkpoint(path, metadata={"tokenizer": tokenizer.name})
                if isinstance(tokenizer, FileTokenizer):  # a resumed run reads text the same way
                    shutil.copy(tokenizer.path, path / "tokenizer.json")
                progress.console.print(f"checkpoint {path}  (ce {parts['ce']:.4f})")
    if first is not None:
        console.print(f"cross-entropy {first:.4f} → {last:.4f} over updates {start + 1}..{steps}")
    return first, last
