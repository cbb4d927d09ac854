"""trajectory: differences that appear only after the first update."""

from __future__ import annotations

import numpy as np

from .core import Diagnosis, matches


def trajectory(result, out, case) -> Diagnosis | None:
    loss = out.tensors.get("trajectory.loss")
    if loss is None:
        return None
    ref = case.golden["trajectory.loss"]
    off = [i for i, (a, b) in enumerate(zip(np.ravel(loss), ref)) if not matches(float(a), float(b))]
    evidence = {"loss_port": [float(x) for x in loss], "loss_reference": [float(x) for x in ref]}
    if off:
        step = off[0] + 1
        return Diagnosis(
            "trajectory_divergence",
            f"losses agree up to update {step - 1} and diverge from update {step}: "
            "a difference that appears only after the first update (bias-correction step, schedule, state carried between steps)",
            evidence | {"first_divergent_update": step},
        )
    return Diagnosis("trajectory_divergence", "losses agree but the parameters drift apart over the updates", evidence)
