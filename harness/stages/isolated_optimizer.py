"""isolated_optimizer: one update (clip, AdamW's first step) from the reference's own gradients, from a
fresh load. It updates the parameters the port loaded: harness/findings.py checks those per finding."""

from __future__ import annotations

import numpy as np

from ..diagnosis.isolated import isolated
from ..diagnosis.optimizer import optimizer
from .base import Session, Stage, StageOutput, as_f32

PREFIX = "isolated.optimizer."


def given_gradients(s: Session, case) -> dict[str, np.ndarray]:
    """The reference's own gradients of the parameters this session trains."""
    names = s.trainable_names()
    return {
        k.removeprefix("grad."): v
        for k, v in case.golden.items()
        if k.startswith("grad.") and k.removeprefix("grad.") in names
    }


def compute(s: Session, case) -> StageOutput:
    names = s.trainable_names()
    before = {k: as_f32(v).copy() for k, v in s.parameters(names).items()}
    s.update_from_gradients(given_gradients(s, case))
    after, state = s.parameters(names), s.optimizer_state()
    out = {f"{PREFIX}delta.{k}": as_f32(after[k]) - before[k] for k in before}
    out.update({f"{PREFIX}m.{k}": as_f32(v) for k, v in state["m"].items()})
    out.update({f"{PREFIX}v.{k}": as_f32(v) for k, v in state["v"].items()})
    out[f"{PREFIX}step"] = np.array(state["step"], dtype=np.int64)
    return StageOutput(out)


STAGE = Stage(
    "isolated_optimizer",
    "iso optim",
    compute,
    golden_prefix=PREFIX,
    optional=True,
    truth=True,
    sensitive=True,
    diagnose=isolated(optimizer, PREFIX),
)
