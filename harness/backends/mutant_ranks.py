"""One rank of a mutant trained data-parallel (`mlx.launch … -m mlx_parity.harness.backends.mutant_ranks`):
the reference's rank (`mlx_parity.reference.data_parallel`) with the mutant's trainer, so the audit's
data-parallel stage judges the mutants as it judges any backend's ranks.

    mlx.launch --backend ring -n 2 --python PYTHON -- -m mlx_parity.harness.backends.mutant_ranks \\
        CHECKPOINT BATCH SETTINGS OUT [--lora-init FILE] [--steps N] --mutant NAME
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
from safetensors.numpy import load_file, save_file

from mlx_parity.reference.data_parallel import arguments, rank_outputs
from mlx_parity.reference.settings import TrainSettings

from .mutants import MUTANTS, build


def main(argv=None) -> int:
    ap = arguments(__doc__)
    ap.add_argument("--mutant", required=True, choices=sorted(MUTANTS))
    a = ap.parse_args(argv)
    group = mx.distributed.init(strict=True)  # started by mlx.launch
    settings = TrainSettings.from_dict(json.loads(a.settings.read_text()))
    trainer, _ = build(MUTANTS[a.mutant], a.checkpoint, settings, a.lora_init, strict=False)
    trainer.group = group if group.size() > 1 else None  # what Trainer(group=...) stores, for any mutant's __init__
    result = rank_outputs(
        trainer, a.steps or settings.steps, load_file(str(a.batch)), lambda v: np.array(v.astype(mx.float32))
    )
    a.out.mkdir(parents=True, exist_ok=True)
    save_file(result, str(a.out / f"rank{group.rank()}.safetensors"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
