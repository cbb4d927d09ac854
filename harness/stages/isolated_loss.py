"""isolated_loss: the loss parts of the reference's own logits."""

from __future__ import annotations

import numpy as np

from ..diagnosis.isolated import isolated
from ..diagnosis.loss import loss
from .base import Session, Stage, StageOutput, precision_of

PREFIX = "isolated.loss."


def compute(s: Session, case) -> StageOutput:
    parts = s.loss_from_logits(case.golden["forward.logits"], case.batch)
    return StageOutput({f"{PREFIX}{k}": np.array(parts[k], dtype=precision_of(s)) for k in ("ce", "distrust", "total")})


STAGE = Stage(
    "isolated_loss",
    "iso loss",
    compute,
    golden_prefix=PREFIX,
    read_only=True,
    optional=True,
    truth=True,
    diagnose=isolated(loss, PREFIX),
)
