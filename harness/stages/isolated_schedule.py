"""isolated_schedule: `steps` updates from a fresh load, each with the reference's own gradients (the same
every step): the schedule, the bias correction's step and the state carried between updates."""

from __future__ import annotations

import numpy as np

from ..diagnosis.isolated_schedule import schedule
from .base import Session, Stage, StageOutput, as_f32
from .isolated_optimizer import given_gradients

PREFIX = "isolated.schedule."


def compute(s: Session, case) -> StageOutput:
    names = s.trainable_names()
    before = {k: as_f32(v).copy() for k, v in s.parameters(names).items()}
    grads = given_gradients(s, case)
    for _ in range(case.settings.steps):
        s.update_from_gradients(grads)
    after = s.parameters(names)
    out = {f"{PREFIX}delta.{k}": as_f32(after[k]) - before[k] for k in before}
    out[f"{PREFIX}step"] = np.array(s.optimizer_state()["step"], dtype=np.int64)
    return StageOutput(out)


STAGE = Stage(
    "isolated_schedule",
    "iso sched",
    compute,
    golden_prefix=PREFIX,
    optional=True,
    repeats="isolated_optimizer",
    truth=True,
    sensitive=True,
    diagnose=schedule,
)
