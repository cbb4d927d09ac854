"""checkpoint: a resumed run that differs from the same backend's uninterrupted one."""

from __future__ import annotations

from .core import Diagnosis


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
