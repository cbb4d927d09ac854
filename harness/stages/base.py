"""What every stage shares: its declaration (`Stage`), its output, the trainer session it computes from,
and the helpers its computation uses."""

from __future__ import annotations

import ctypes
import functools
import gc
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Stage:
    """One stage, declared once: every table of the harness (the order, the golden names, the truth flags,
    what it consumes, its isolated twin, its judgement, its diagnosis, its report label) derives from these."""

    name: str
    label: str  # the report's column
    compute: Callable | None  # (session, case) -> StageOutput; with `reopens`, (session, case, factory)
    golden_prefix: str | None = None  # the names of its goldens; None: judged against something else
    read_only: bool = False  # leaves the session unchanged, so it shares one load with the others
    reopens: bool = False  # opens sessions of its own (the checkpoint stage resumes from a saved state)
    optional: bool = False  # an isolated request: a backend may leave it unchecked, never passed
    consumes: tuple[str, ...] = ()  # the stages whose outputs it computes from
    isolated_by: str | None = None  # its isolated twin: the same piece on the reference's inputs
    repeats: str | None = None  # an isolated check that repeats another (N updates of the one update)
    truth: bool = False  # its goldens are judged against the float64 truth
    sensitive: bool = False  # updates: the truth stores each element's sensitivity to a gradient error
    multi_update: bool = False  # several updates, each from gradients the backend computed itself
    losses: bool = False  # reports per-update losses, plotted against the reference's
    launched: bool = False  # run by N ranks of the backend's launcher (`--world-size`), not by a session
    judge: Callable | None = None  # (out, case, tol, run_to_run) -> Judged; None: its goldens, by name
    diagnose: Callable | None = None  # why it failed (harness/diagnosis/<name>.py)
    probe: Callable | None = None  # (backend, case) -> diagnoses from the backend run on inputs built to show a cause

    @property
    def tolerance(self) -> str:
        """The key of its tolerance in harness/tolerances.py's table (with the training precision)."""
        return self.name


@dataclass
class Judged:
    """A stage-specific judgement: the tensors compared, a message when something else failed (the load
    report), and a note for the stage's tolerance text (the bound a nondeterministic device used)."""

    tensors: list = field(default_factory=list)
    message: str = ""
    note: str = ""


class Unsupported(Exception):
    """A backend that does not implement an optional request: reported as not checked, never as a pass."""


@dataclass
class StageOutput:
    """What a backend produced for one stage: named tensors, metadata, or the error that stopped it."""

    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    error: str | None = None
    unsupported: str | None = None  # the backend's own word that it does not implement the request


class Session(Protocol):
    """A loaded model + trainer of one backend. Arrays returned are numpy float32 (int32 for ids)."""

    def load_report(self) -> dict: ...
    def parameters(self, names: list[str] | None = None) -> dict[str, np.ndarray]: ...  # all, or only `names`
    def trainable_names(self) -> list[str]: ...
    def forward(self, input_ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]: ...
    def shifted(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def loss(self, batch: dict) -> dict[str, float]: ...
    def gradients(self, batch: dict) -> tuple[dict[str, float], dict[str, np.ndarray]]: ...
    def step(self, batch: dict) -> dict[str, float]: ...
    def optimizer_state(self) -> dict: ...
    def save_checkpoint(self, path: Path) -> None: ...
    # optional (isolated requests); raise Unsupported when not implemented
    def loss_from_logits(self, logits: np.ndarray, batch: dict) -> dict[str, float]: ...
    def update_from_gradients(self, grads: dict[str, np.ndarray]) -> None: ...
    def pieces(self, input_ids: np.ndarray, given: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class SessionFactory(Protocol):
    def open(self, case, strict: bool = True) -> Session: ...
    def resume(self, case, path: Path) -> Session: ...


def precision_of(s: Session):
    """float32, or float64 for a session that computes the truth (the float64 twin)."""
    return getattr(s, "precision", np.float32)


def as_f32(x) -> np.ndarray:
    """Float arrays as float32, except float64 ones, which only the truth produces and keeps."""
    x = np.asarray(x)
    return x if x.dtype == np.float64 else x.astype(np.float32)


def trainable(s: Session) -> dict[str, np.ndarray]:
    return {k: as_f32(v).copy() for k, v in s.parameters(s.trainable_names()).items()}


def run_updates(s: Session, case, steps: int, initial: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """`steps` updates; the change of each trainable parameter since `initial`, and the losses.
    Changes, not values: a parameter near 1 would hide a missed update inside a relative tolerance."""
    losses = [s.step(case.batch)["total"] for _ in range(steps)]
    out = {f"{prefix}.delta.{k}": v - initial[k] for k, v in trainable(s).items() if k in initial}
    out[f"{prefix}.loss"] = np.asarray(losses, dtype=precision_of(s))
    return out


LARGE_CHECKPOINT = 64 * 2**20  # bytes of weights from which a dropped trainer is collected at once


def release(case) -> None:
    """Free a dropped trainer's copy of a large model now: its model and closures form reference cycles,
    which Python collects only when it next runs its cycle collector; MLX keeps freed buffers in its own
    cache; and glibc keeps the heap pages that freed numpy arrays leave (on SmolLM2-135M the harness grew by
    400 MB per stage with MLX holding nothing) until `malloc_trim` hands them back. A full collection costs
    ~0.1 s once torch is loaded, so the bundled toy models (under 1 MB) skip it."""
    if _weights_bytes(str(case.checkpoint)) >= LARGE_CHECKPOINT:
        gc.collect()
        if "mlx.core" in sys.modules:
            sys.modules["mlx.core"].clear_cache()
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform.startswith("linux") else None
        if trim is not None:  # glibc only
            trim(0)


@functools.cache
def _weights_bytes(checkpoint: str) -> int:
    return sum(f.stat().st_size for f in Path(checkpoint).glob("*.safetensors"))
