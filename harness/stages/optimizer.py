"""optimizer: one update (Δθ, AdamW's moments, the step), against the truth; the step exactly."""

from __future__ import annotations

import numpy as np

from ..diagnosis.optimizer import optimizer
from .base import Session, Stage, StageOutput, as_f32, precision_of


def compute(s: Session, case) -> StageOutput:
    names = s.trainable_names()
    before = {k: as_f32(v).copy() for k, v in s.parameters(names).items()}  # not the frozen model: a real one is large
    parts = s.step(case.batch)
    after = s.parameters(names)
    state = s.optimizer_state()
    out = {f"optimizer.delta.{k}": as_f32(after[k]) - before[k] for k in before}
    out.update({f"optimizer.m.{k}": as_f32(v) for k, v in state["m"].items()})
    out.update({f"optimizer.v.{k}": as_f32(v) for k, v in state["v"].items()})
    out["optimizer.step"] = np.array(state["step"], dtype=np.int64)
    out["optimizer.loss"] = np.array(parts["total"], dtype=precision_of(s))
    return StageOutput(out)


STAGE = Stage(
    "optimizer",
    "optim",
    compute,
    golden_prefix="optimizer.",
    consumes=("gradients",),
    isolated_by="isolated_optimizer",
    truth=True,
    sensitive=True,
    diagnose=optimizer,
)
