"""The backend interface and the adapter that turns a trainer session into stage outputs."""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..stages import STAGES, Session, StageOutput, Unsupported, compute


@dataclass(frozen=True)
class Ranks:
    """How a backend trains data-parallel (harness/data_parallel.py): an engine's own launcher (`mlx`:
    mlx.launch, `torch`: torchrun) starts `command` once per rank. A rank module takes the command line of
    `mlx_parity.reference.data_parallel.arguments` and writes OUT/rank<r>.safetensors; a program behind the
    protocol (`protocol`) takes REQUEST_DIR RESPONSE_DIR and writes RESPONSE_DIR/data_parallel.rank<r>.safetensors
    (docs/protocol.md)."""

    launcher: str
    command: tuple[str, ...]
    protocol: bool = False


def python_module(launcher: str, module: str, *options: str) -> Ranks:
    """Ranks that run `python -m module` with this interpreter."""
    return Ranks(launcher, (sys.executable, "-m", module, *options))


class BackendError(ValueError):
    pass


class Backend(ABC):
    name: str = ""
    ranks: Ranks | None = None  # None: it has no data-parallel launch, and the data_parallel stage is not checked
    precisions: tuple[str, ...] | None = None  # the training precisions it implements (None: every one)

    def unavailable(self) -> str | None:
        """None when the backend can run here, else the reason it cannot."""
        return None

    @abstractmethod
    def run(self, case, stages=STAGES) -> dict[str, StageOutput]:
        """Every requested stage's outputs; a stage that fails carries its error, never raises."""


class TrainerBackend(Backend):
    """A backend that runs in this process through a `Session` per fresh load."""

    @abstractmethod
    def open(self, case, strict: bool = True) -> Session: ...

    @abstractmethod
    def resume(self, case, path: Path) -> Session: ...

    def run(self, case, stages=STAGES) -> dict[str, StageOutput]:
        return compute(self, case, stages)

    def rank_outputs(self, case) -> tuple[int, dict[str, np.ndarray]]:
        """This process as one rank of a data-parallel run its launcher started: (its rank, what it writes,
        named as `mlx_parity.reference.data_parallel.rank_outputs` names it). Unsupported: one process only."""
        raise Unsupported(f"{self.name} trains on one process only")


class TrainerSession:
    """A `Session` over a trainer with the surface of `mlx_parity.reference.trainer.Trainer`; subclasses say how
    their arrays become numpy and how they run the forward pass and the shift."""

    def __init__(self, trainer, report: dict):
        self.t, self.report = trainer, report

    def to_numpy(self, x) -> np.ndarray:
        raise NotImplementedError

    def _np(self, d: dict) -> dict[str, np.ndarray]:
        return {k: self.to_numpy(v) for k, v in d.items()}

    def load_report(self) -> dict:
        return self.report

    def parameters(self, names=None):
        params = self.t.parameters()
        return self._np(params if names is None else {k: params[k] for k in names})

    def trainable_names(self):
        return self.t.trainable_names()

    def loss(self, batch):
        return self.t.loss(batch)

    def gradients(self, batch):
        parts, grads = self.t.gradients(batch)
        return parts, self._np(grads)

    def step(self, batch):
        return self.t.step(batch)

    def optimizer_state(self):
        st = self.t.optimizer_state()
        return {"step": st["step"], "m": self._np(st["m"]), "v": self._np(st["v"])}

    def save_checkpoint(self, path: Path):
        self.t.save_checkpoint(path)

    def loss_from_logits(self, logits, batch):
        if not hasattr(self.t, "loss_from_logits"):
            raise Unsupported(f"{type(self.t).__name__} does not compute the loss from given logits")
        return self.t.loss_from_logits(logits, batch)

    def pieces(self, input_ids, given):
        if not hasattr(self.t, "pieces"):
            raise Unsupported(f"{type(self.t).__name__} does not compute the forward's pieces from given inputs")
        return self._np(self.t.pieces(input_ids, given))

    def update_from_gradients(self, grads):
        if not hasattr(self.t, "update_from_gradients"):
            raise Unsupported(f"{type(self.t).__name__} does not apply given gradients")
        self.t.update_from_gradients(grads)
