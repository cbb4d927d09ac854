"""The torch twin trained data-parallel: one rank of `torchrun` (gloo on the CPU), writing what it holds after
N updates in the layout of `mlx_parity.reference.data_parallel`, so both engines' ranks compare name for name.

    torchrun --nproc-per-node 2 -m mlx_parity.harness.twin_data_parallel \\
        CHECKPOINT BATCH SETTINGS OUT [--lora-init FILE] [--steps N] [--backend gloo]

The process group is torch's own (`init_process_group` from torchrun's environment); nothing here opens a
connection. Each rank writes `OUT/rank<r>.safetensors`: `optimizer.*` after the first update, `trajectory.*` after the last.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.numpy import load_file, save_file

from mlx_parity.reference.data_parallel import arguments, rank_outputs
from mlx_parity.reference.settings import TrainSettings

from .torch_twin import TwinTrainer


def run(checkpoint: Path, batch: dict, settings: TrainSettings, steps: int, lora_init=None) -> dict:
    """`steps` updates on `batch` by this rank (one process when no group is initialised): its arrays."""
    trainer, _ = TwinTrainer.from_pretrained(checkpoint, settings, lora_init)
    return rank_outputs(trainer, steps, batch, lambda t: t.detach().to(torch.float32).numpy().copy())  # not a view


def main(argv=None) -> int:
    ap = arguments(__doc__)
    ap.add_argument("--backend", default="gloo", help="torch.distributed backend (gloo on the CPU, nccl on GPUs)")
    a = ap.parse_args(argv)
    dist.init_process_group(a.backend)  # torchrun's environment: a missing launcher is an error here
    try:
        settings = TrainSettings.from_dict(json.loads(a.settings.read_text()))
        result = run(a.checkpoint, load_file(str(a.batch)), settings, a.steps or settings.steps, a.lora_init)
        a.out.mkdir(parents=True, exist_ok=True)
        save_file(result, str(a.out / f"rank{dist.get_rank()}.safetensors"))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
