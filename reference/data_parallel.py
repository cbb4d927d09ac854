"""The reference trained data-parallel: one rank of `mlx.launch`, writing what it holds after N updates.

    mlx.launch --backend ring -n 2 --python PYTHON -m mlx_parity.reference.data_parallel \\
        CHECKPOINT BATCH SETTINGS OUT [--lora-init FILE] [--steps N]

Every rank loads the same checkpoint, takes its contiguous share of each micro-batch of BATCH (a
safetensors file: input_ids, attention_mask, auth_weight, prov_entropy), averages gradients and losses over
the ranks (`Trainer(group=...)`) and runs `steps` updates (default: the settings'). Each rank writes
`OUT/rank<r>.safetensors`: Δθ, the moments, the step and the losses after the first update (`optimizer.*`) and
after the last (`trajectory.*`), named as the stages name them, so that ranks are compared with each other and
judged as one process is (docs/training-step.md, data parallelism). The group is MLX's own (`mx.distributed.init`), started
by its launcher; nothing here opens a connection.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from safetensors.numpy import load_file, save_file

from .settings import TrainSettings
from .trainer import Trainer


def rank_outputs(trainer, steps: int, batch: dict, as_numpy) -> dict:
    """`steps` updates of `trainer` (the reference's or the twin's, one surface) and what a rank writes, named as
    the optimizer and trajectory stages name theirs: after the first update `optimizer.delta.*`, `optimizer.m.*`,
    `optimizer.v.*`, `optimizer.step`, `optimizer.loss`; after the last `trajectory.*` likewise, with
    `trajectory.loss` the total before each update. Float32 through `as_numpy`; steps int64."""
    names = trainer.trainable_names()
    before = {k: as_numpy(v) for k, v in trainer.parameters().items() if k in names}
    out, losses = {}, []
    for i in range(steps):
        losses.append(trainer.step(batch)["total"])
        if i == 0:
            out |= _held(trainer, before, "optimizer", as_numpy) | {"optimizer.loss": np.array(losses[0], np.float32)}
    return out | _held(trainer, before, "trajectory", as_numpy) | {"trajectory.loss": np.array(losses, np.float32)}


def _held(trainer, before: dict, prefix: str, as_numpy) -> dict:
    """What the rank holds now: Δθ since `before`, the moments and the step count."""
    after, state = trainer.parameters(), trainer.optimizer_state()
    out = {f"{prefix}.delta.{k}": as_numpy(after[k]) - v for k, v in before.items()}
    out |= {f"{prefix}.{moment}.{k}": as_numpy(v) for moment in ("m", "v") for k, v in state[moment].items()}
    out[f"{prefix}.step"] = np.array(state["step"], dtype=np.int64)
    return out


def arguments(description: str) -> argparse.ArgumentParser:
    """The command line every rank of either engine takes."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("batch", type=Path)
    ap.add_argument("settings", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--lora-init", type=Path)
    ap.add_argument("--steps", type=int, help="updates (default: the settings' steps)")
    return ap


def run(checkpoint: Path, batch: dict, settings: TrainSettings, steps: int, group, lora_init=None) -> dict:
    """`steps` updates on `batch` by this rank of `group`: its arrays to write (float32, and int64 `step`)."""
    trainer, _ = Trainer.from_pretrained(checkpoint, settings, lora_init, group=group)
    return rank_outputs(trainer, steps, batch, lambda v: np.array(v.astype(mx.float32)))


def main(argv=None) -> int:
    a = arguments(__doc__).parse_args(argv)
    group = mx.distributed.init(strict=True)  # started by mlx.launch: a missing launcher is an error here
    settings = TrainSettings.from_dict(json.loads(a.settings.read_text()))
    batch = load_file(str(a.batch))
    result = run(a.checkpoint, batch, settings, a.steps or settings.steps, group, a.lora_init)
    a.out.mkdir(parents=True, exist_ok=True)
    save_file(result, str(a.out / f"rank{group.rank()}.safetensors"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
