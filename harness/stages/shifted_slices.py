"""shifted_slices: the next-token targets and their mask, exactly."""

from __future__ import annotations

import numpy as np

from ..diagnosis.shifted_slices import shifted
from .base import Session, Stage, StageOutput, as_f32


def compute(s: Session, case) -> StageOutput:
    targets, mask = s.shifted(case.batch["input_ids"], case.batch["attention_mask"])
    return StageOutput({"shifted.targets": np.asarray(targets, dtype=np.int32), "shifted.mask": as_f32(mask)})


STAGE = Stage("shifted_slices", "shift", compute, golden_prefix="shifted.", read_only=True, diagnose=shifted)
