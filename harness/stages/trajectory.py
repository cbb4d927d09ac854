"""trajectory: N updates, θ_N − θ_0 and the losses, against the truth."""

from __future__ import annotations

from ..diagnosis.trajectory import trajectory
from .base import Session, Stage, StageOutput, run_updates, trainable


def compute(s: Session, case) -> StageOutput:
    return StageOutput(run_updates(s, case, case.settings.steps, trainable(s), "trajectory"))


STAGE = Stage(
    "trajectory",
    "traject",
    compute,
    golden_prefix="trajectory.",
    consumes=("optimizer",),
    isolated_by="isolated_schedule",
    truth=True,
    sensitive=True,
    multi_update=True,
    losses=True,
    diagnose=trajectory,
)
