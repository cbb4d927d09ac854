"""loss: the cross-entropy, the distrust term and their total, against the truth."""

from __future__ import annotations

import numpy as np

from ..diagnosis.loss import loss
from .base import Session, Stage, StageOutput, precision_of


def compute(s: Session, case) -> StageOutput:
    parts = s.loss(case.batch)
    return StageOutput({f"loss.{k}": np.array(parts[k], dtype=precision_of(s)) for k in ("ce", "distrust", "total")})


STAGE = Stage(
    "loss",
    "loss",
    compute,
    golden_prefix="loss.",
    read_only=True,
    consumes=("forward", "shifted_slices"),
    isolated_by="isolated_loss",
    truth=True,
    diagnose=loss,
)
