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
    if off and off[0] == 0:  # before any update: not a difference that appears after one
        return Diagnosis(
            "unexplained",
            "the trajectory's first loss, computed before any update, already differs: the forward or the loss "
            "differs, not something an update carries",
            evidence | {"first_divergent_update": 0},
        )
    if off:
        step = off[0]
        return Diagnosis(
            "trajectory_divergence",
            f"the losses before updates 1..{step} agree and the loss after update {step} differs: "
            "a difference that appears only after the first update (bias-correction step, schedule, state carried between steps)",
            evidence | {"first_divergent_update": step},
        )
    return Diagnosis("trajectory_divergence", "losses agree but the parameters drift apart over the updates", evidence)
