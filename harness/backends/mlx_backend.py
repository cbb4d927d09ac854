"""The MLX reference as a backend."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_parity.reference.data_parallel import rank_outputs
from mlx_parity.reference.loss import shifted_slices
from mlx_parity.reference.trainer import Trainer

from ..device import current
from .base import TrainerBackend, TrainerSession, python_module


class MLXSession(TrainerSession):
    def to_numpy(self, x) -> np.ndarray:
        """bfloat16 (which numpy lacks) as the float32 holding its values exactly."""
        return np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x, order="C")

    def forward(self, input_ids):
        logits, hidden = self.t.model.forward(mx.array(np.asarray(input_ids, dtype=np.int32)))
        return self.to_numpy(logits), [self.to_numpy(h) for h in hidden]

    def shifted(self, input_ids, attention_mask):
        ids = mx.array(np.asarray(input_ids, dtype=np.int32))
        _, targets, mask = shifted_slices(ids[..., None], ids, mx.array(np.asarray(attention_mask, dtype=np.int32)))
        return np.array(targets), np.array(mask)


class MLXBackend(TrainerBackend):
    name = "mlx"
    ranks = python_module("mlx", "mlx_parity.reference.data_parallel")

    def open(self, case, strict: bool = True) -> MLXSession:
        trainer, report = Trainer.from_pretrained(case.checkpoint, case.settings, case.lora_init, strict=strict)
        return MLXSession(trainer, report.to_dict())

    def resume(self, case, path: Path) -> MLXSession:
        return MLXSession(Trainer.load_checkpoint(path), {})

    def rank_outputs(self, case):
        group = mx.distributed.init(strict=True)  # the launcher's environment (mlx.launch): none is an error
        trainer = self.open(case, strict=False).t
        trainer.group = group if group.size() > 1 else None  # all that Trainer(group=...) stores
        steps, as_numpy = case.settings.steps, lambda v: np.array(v.astype(mx.float32))
        return group.rank(), rank_outputs(trainer, steps, case.batch, as_numpy)

    @property
    def nondeterministic(self) -> bool:
        """On a GPU (`mx.set_default_device(mx.gpu)`, `harness/device.py`) reductions are not
        bit-deterministic run to run: the checkpoint stage then measures that spread."""

        return current().nondeterministic
