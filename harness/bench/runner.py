"""One backend inside a bench process (used by bench/conftest.py): its trainer with the operations the
suite times, its thread count, and the process's peak memory."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import mlx.core as mx

from mlx_parity.reference.blas import active
from mlx_parity.reference.settings import TrainSettings
from mlx_parity.reference.trainer import Trainer

from .workload import SETTINGS


def mlx_rs_unavailable() -> str | None:
    try:
        import parity_mlx_rs  # noqa: F401  (the optional Rust extension, built by rust/build.sh)
    except ImportError as e:
        return f"not built ({e}); build it with rust/build.sh"
    return None


def set_threads(backend: str, threads: int) -> None:
    if backend == "torch":
        import torch  # here, not at the top: only a torch process loads torch

        torch.set_num_threads(threads)


def backend_threads(backend: str) -> int | None:
    if backend == "torch":
        import torch  # here, not at the top: only a torch process loads torch

        return torch.get_num_threads()
    return active().threads


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Runner:
    """One backend's trainer on a checkpoint, with the operations the suite times. Every method returns
    only after the work is done (MLX is lazy: each evaluates what it computes)."""

    def __init__(self, backend: str, checkpoint: Path):
        self.backend, self.checkpoint = backend, checkpoint
        self.t = self.load()

    def load(self):
        settings = TrainSettings.from_dict(SETTINGS)
        if self.backend == "mlx":
            return Trainer.from_pretrained(self.checkpoint, settings)[0]
        if self.backend == "torch":
            from ..torch_twin import TwinTrainer  # here, not at the top: only a torch process loads torch

            return TwinTrainer.from_pretrained(self.checkpoint, settings)[0]
        import parity_mlx_rs  # the optional Rust extension: only an mlx-rs process loads it

        return parity_mlx_rs.Trainer(str(self.checkpoint), json.dumps(SETTINGS), None, True)

    def forward(self, ids):
        if self.backend == "mlx":
            logits, hidden = self.t.model.forward(mx.array(ids))
            mx.eval(logits, hidden)
            return logits
        return self.t.forward(ids)

    def loss(self, batch):
        return self.t.loss(batch)

    def gradients(self, batch):
        return self.t.gradients(batch)

    def step(self, batch):
        return self.t.step(batch)

    def save(self, path: Path):
        self.t.save_checkpoint(path) if self.backend != "mlx-rs" else self.t.save_checkpoint(str(path))
