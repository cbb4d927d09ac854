"""gradients: the gradient of every trainable parameter (a different trainable set fails here), against the truth."""

from __future__ import annotations

from ..diagnosis.gradients import gradients
from .base import Session, Stage, StageOutput, as_f32


def compute(s: Session, case) -> StageOutput:
    _, grads = s.gradients(case.batch)
    return StageOutput({f"grad.{k}": as_f32(v) for k, v in grads.items()})


STAGE = Stage(
    "gradients",
    "grads",
    compute,
    golden_prefix="grad.",
    read_only=True,
    consumes=("loss",),
    truth=True,
    diagnose=gradients,
)
