"""The eight stages, in order, and how each one's named outputs are computed from a trainer session.

Every compared tensor has a stable name shared by all backends (`forward.hidden.1`,
`grad.model.norm.weight`, `optimizer.m.lm_head.weight`), so a failure says exactly which.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from . import pieces

STAGES = ("weight_mapping", "forward", "shifted_slices", "loss", "gradients", "optimizer", "trajectory", "checkpoint")
# Optional requests: one piece judged on the reference's own inputs, so a bug upstream cannot mask it.
ISOLATED_STAGES = ("isolated_forward", "isolated_loss", "isolated_optimizer", "isolated_schedule")
ALL_STAGES = STAGES + ISOLATED_STAGES
# The names each stage's outputs carry (weight_mapping's and checkpoint's are judged apart).
PREFIX = {
    "forward": "forward.",
    "shifted_slices": "shifted.",
    "loss": "loss.",
    "gradients": "grad.",
    "optimizer": "optimizer.",
    "trajectory": "trajectory.",
    "isolated_forward": "isolated.forward.",
    "isolated_loss": "isolated.loss.",
    "isolated_optimizer": "isolated.optimizer.",
    "isolated_schedule": "isolated.schedule.",
}


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


def _prec(s: Session):
    """float32, or float64 for a session that computes the truth (the float64 twin)."""
    return getattr(s, "precision", np.float32)


def _f32(x) -> np.ndarray:
    """Float arrays as float32, except float64 ones, which only the truth produces and keeps."""
    x = np.asarray(x)
    return x if x.dtype == np.float64 else x.astype(np.float32)


def weight_mapping(s: Session, case) -> StageOutput:
    params = s.parameters()
    return StageOutput({f"weights.{k}": v for k, v in params.items()}, meta={"load_report": s.load_report()})


def forward(s: Session, case) -> StageOutput:
    logits, hidden = s.forward(case.batch["input_ids"])
    out = {"forward.logits": _f32(logits)}
    out.update({f"forward.hidden.{i}": _f32(h) for i, h in enumerate(hidden)})
    return StageOutput(out)


def shifted_slices(s: Session, case) -> StageOutput:
    targets, mask = s.shifted(case.batch["input_ids"], case.batch["attention_mask"])
    return StageOutput({"shifted.targets": np.asarray(targets, dtype=np.int32), "shifted.mask": _f32(mask)})


def loss(s: Session, case) -> StageOutput:
    parts = s.loss(case.batch)
    return StageOutput({f"loss.{k}": np.array(parts[k], dtype=_prec(s)) for k in ("ce", "distrust", "total")})


def gradients(s: Session, case) -> StageOutput:
    _, grads = s.gradients(case.batch)
    return StageOutput({f"grad.{k}": _f32(v) for k, v in grads.items()})


def optimizer(s: Session, case) -> StageOutput:
    names = s.trainable_names()
    before = {k: _f32(v).copy() for k, v in s.parameters(names).items()}  # not the frozen model: a real one is large
    parts = s.step(case.batch)
    after = s.parameters(names)
    state = s.optimizer_state()
    out = {f"optimizer.delta.{k}": _f32(after[k]) - before[k] for k in before}
    out.update({f"optimizer.m.{k}": _f32(v) for k, v in state["m"].items()})
    out.update({f"optimizer.v.{k}": _f32(v) for k, v in state["v"].items()})
    out["optimizer.step"] = np.array(state["step"], dtype=np.int64)
    out["optimizer.loss"] = np.array(parts["total"], dtype=_prec(s))
    return StageOutput(out)


def _trainable(s: Session) -> dict[str, np.ndarray]:
    return {k: _f32(v).copy() for k, v in s.parameters(s.trainable_names()).items()}


def _run(s: Session, case, steps: int, initial: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """`steps` updates; the change of each trainable parameter since `initial`, and the losses.
    Changes, not values: a parameter near 1 would hide a missed update inside a relative tolerance."""
    losses = [s.step(case.batch)["total"] for _ in range(steps)]
    out = {f"{prefix}.delta.{k}": v - initial[k] for k, v in _trainable(s).items() if k in initial}
    out[f"{prefix}.loss"] = np.asarray(losses, dtype=_prec(s))
    return out


def trajectory(s: Session, case) -> StageOutput:
    return StageOutput(_run(s, case, case.settings.steps, _trainable(s), "trajectory"))


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


def checkpoint(s: Session, case, factory: SessionFactory) -> StageOutput:
    """Run to `checkpoint_at`, save, resume in a fresh session, finish; also run uninterrupted (twice on a
    nondeterministic device: `checkpoint.repeat.*`, what the resume is judged against, harness/device.py)."""
    k, n = case.settings.checkpoint_at, case.settings.steps
    initial = _trainable(s)
    first = [s.step(case.batch)["total"] for _ in range(k)]
    precision = _prec(s)
    with tempfile.TemporaryDirectory(prefix="parity-ckpt-") as tmp:
        s.save_checkpoint(Path(tmp) / "ckpt")
        del s  # one model in memory at a time: a real model's copies add up
        release(case)
        resumed = factory.resume(case, Path(tmp) / "ckpt")
        out = _run(resumed, case, n - k, initial, "checkpoint")
    del resumed
    release(case)
    out["checkpoint.loss"] = np.concatenate([np.asarray(first, dtype=precision), out["checkpoint.loss"]])
    fresh = factory.open(case, strict=False)
    out.update(_run(fresh, case, n, _trainable(fresh), "checkpoint.uninterrupted"))
    if getattr(
        factory, "nondeterministic", False
    ):  # a GPU: the uninterrupted run again, its spread is the device's noise
        del fresh
        release(case)
        again = factory.open(case, strict=False)
        out.update(_run(again, case, n, _trainable(again), "checkpoint.repeat"))
    return StageOutput(out)


def isolated_forward(s: Session, case) -> StageOutput:
    """Every piece of the forward pass from the reference's own values of its inputs (`harness/pieces.py`)."""
    out = s.pieces(case.batch["input_ids"], pieces.given(case.golden))
    return StageOutput({pieces.PREFIX + k: _f32(v) for k, v in out.items()})


def isolated_loss(s: Session, case) -> StageOutput:
    """The loss parts of the reference's own logits."""
    parts = s.loss_from_logits(case.golden["forward.logits"], case.batch)
    return StageOutput({f"isolated.loss.{k}": np.array(parts[k], dtype=_prec(s)) for k in ("ce", "distrust", "total")})


def isolated_optimizer(s: Session, case) -> StageOutput:
    """One update (clip, AdamW at step 0) from the reference's own gradients, from a fresh load."""
    names = s.trainable_names()
    before = {k: _f32(v).copy() for k, v in s.parameters(names).items()}
    s.update_from_gradients(
        {
            k.removeprefix("grad."): v
            for k, v in case.golden.items()
            if k.startswith("grad.") and k.removeprefix("grad.") in names
        }
    )
    after, state = s.parameters(names), s.optimizer_state()
    out = {f"isolated.optimizer.delta.{k}": _f32(after[k]) - before[k] for k in before}
    out.update({f"isolated.optimizer.m.{k}": _f32(v) for k, v in state["m"].items()})
    out.update({f"isolated.optimizer.v.{k}": _f32(v) for k, v in state["v"].items()})
    out["isolated.optimizer.step"] = np.array(state["step"], dtype=np.int64)
    return StageOutput(out)


def isolated_schedule(s: Session, case) -> StageOutput:
    """`steps` updates from a fresh load, each with the reference's own gradients (the same every step):
    the schedule, the bias correction's step and the state carried between updates, on given inputs."""
    names = s.trainable_names()
    before = {k: _f32(v).copy() for k, v in s.parameters(names).items()}
    grads = {
        k.removeprefix("grad."): v
        for k, v in case.golden.items()
        if k.startswith("grad.") and k.removeprefix("grad.") in names
    }
    for _ in range(case.settings.steps):
        s.update_from_gradients(grads)
    after = s.parameters(names)
    out = {f"isolated.schedule.delta.{k}": _f32(after[k]) - before[k] for k in before}
    out["isolated.schedule.step"] = np.array(s.optimizer_state()["step"], dtype=np.int64)
    return StageOutput(out)


# Stages that leave the session unchanged share one; the others each start from a fresh load.
READ_ONLY = {
    "weight_mapping": weight_mapping,
    "forward": forward,
    "shifted_slices": shifted_slices,
    "loss": loss,
    "gradients": gradients,
}
TRAINING = {
    "optimizer": optimizer,
    "trajectory": trajectory,
    "isolated_optimizer": isolated_optimizer,
    "isolated_schedule": isolated_schedule,
}
READ_ONLY |= {"isolated_forward": isolated_forward, "isolated_loss": isolated_loss}


def compute(factory: SessionFactory, case, stages=STAGES) -> dict[str, StageOutput]:
    """Run the requested stages. Loading is never strict here: a load problem is the weight_mapping
    stage's finding, and the later stages still show what it does to the numbers."""
    results: dict[str, StageOutput] = {}
    shared: Session | None = None
    for i, stage in enumerate(stages):
        if shared is not None and not any(s in READ_ONLY for s in stages[i:]):  # one model in memory at a time
            shared = None
            release(case)
        try:
            if stage in READ_ONLY:
                if shared is None:
                    shared = factory.open(case, strict=False)
                results[stage] = READ_ONLY[stage](shared, case)
            elif stage == "checkpoint":
                results[stage] = checkpoint(factory.open(case, strict=False), case, factory)
            else:
                results[stage] = TRAINING[stage](factory.open(case, strict=False), case)
        except Unsupported as e:
            results[stage] = StageOutput(unsupported=str(e))
        except Exception as e:  # reported as this stage's failure, with the message
            results[stage] = StageOutput(error=f"{type(e).__name__}: {e}")
        if stage not in READ_ONLY:
            release(case)
    if shared is not None:
        shared = None
        release(case)
    return results
