"""isolated_forward: every piece of the forward (harness/pieces.py), each from the reference's own values of
its inputs, so a bug upstream cannot mask one downstream."""

from __future__ import annotations

from .. import pieces
from ..diagnosis.isolated_forward import forward_pieces
from .base import Session, Stage, StageOutput, as_f32


def compute(s: Session, case) -> StageOutput:
    out = s.pieces(case.batch["input_ids"], pieces.given(case.golden))
    return StageOutput({pieces.PREFIX + k: as_f32(v) for k, v in out.items()})


STAGE = Stage(
    "isolated_forward",
    "iso fwd",
    compute,
    golden_prefix=pieces.PREFIX,
    read_only=True,
    optional=True,
    truth=True,
    diagnose=forward_pieces,
)
