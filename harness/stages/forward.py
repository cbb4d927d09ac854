"""forward: the logits and the residual after every layer, at real tokens, against the truth."""

from __future__ import annotations

from ..diagnosis.forward import forward
from ..probes import probe_forward
from .base import Session, Stage, StageOutput, as_f32


def compute(s: Session, case) -> StageOutput:
    logits, hidden = s.forward(case.batch["input_ids"])
    out = {"forward.logits": as_f32(logits)}
    out.update({f"forward.hidden.{i}": as_f32(h) for i, h in enumerate(hidden)})
    return StageOutput(out)


STAGE = Stage(
    "forward",
    "forward",
    compute,
    golden_prefix="forward.",
    read_only=True,
    consumes=("weight_mapping",),
    isolated_by="isolated_forward",
    truth=True,
    diagnose=forward,
    probe=probe_forward,  # when its diagnosis names no cause: the port's own forward on probe batches
)
