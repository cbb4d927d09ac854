"""trajectory and checkpoint: differences that appear only after the first update, or on resume."""

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


def checkpoint(result, out, case) -> Diagnosis | None:
    own = [t for t in result.tensors if "(resumed vs own" in t.name and not t.passed]
    if not own:
        return None
    k = case.settings.checkpoint_at
    resumed, straight = out.tensors.get("checkpoint.loss"), out.tensors.get("checkpoint.uninterrupted.loss")
    evidence = {"checkpoint_at": k}
    if resumed is not None and straight is not None:
        diff = [i + 1 for i, (a, b) in enumerate(zip(resumed, straight)) if a != b]
        evidence["first_different_update"] = diff[0] if diff else None
    return Diagnosis(
        "resume_state_lost",
        f"the resumed run differs from the same backend's uninterrupted run after the checkpoint at update {k}: "
        "optimizer state (m, v, step) or parameters not restored exactly",
        evidence,
    )
