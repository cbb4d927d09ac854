"""The stages, in order, each declared once in its own module (`STAGE`); this registry is what every other
table of the harness derives from: the order, the golden names, the truth flags, what each consumes, its
isolated twin, its judgement, its diagnosis and its report label. The protocol schema and the Rust kit's
stage list are held to it by tests/test_stages.py.

Every compared tensor has a stable name shared by all backends (`forward.hidden.1`,
`grad.model.norm.weight`, `optimizer.m.lm_head.weight`), so a failure says exactly which.
"""

from __future__ import annotations

from . import (
    checkpoint,
    data_parallel,
    forward,
    gradients,
    isolated_forward,
    isolated_loss,
    isolated_optimizer,
    isolated_schedule,
    loss,
    optimizer,
    shifted_slices,
    trajectory,
    weight_mapping,
)
from .base import Judged, Session, SessionFactory, Stage, StageOutput, Unsupported, release

REGISTRY: dict[str, Stage] = {
    m.STAGE.name: m.STAGE
    for m in (
        weight_mapping,
        forward,
        shifted_slices,
        loss,
        gradients,
        optimizer,
        trajectory,
        checkpoint,
        isolated_forward,
        isolated_loss,
        isolated_optimizer,
        isolated_schedule,
        data_parallel,
    )
}
STAGES = tuple(n for n, s in REGISTRY.items() if not s.optional and not s.launched)  # the eight a backend answers
# Optional requests: one piece judged on the reference's own inputs, so a bug upstream cannot mask it.
ISOLATED_STAGES = tuple(n for n, s in REGISTRY.items() if s.optional)
# Run by the backend's ranks, only when asked for (`parity audit --world-size N`): harness/data_parallel.py.
LAUNCHED_STAGES = tuple(n for n, s in REGISTRY.items() if s.launched)
ALL_STAGES = STAGES + ISOLATED_STAGES
# The names each stage's goldens carry (weight_mapping's and checkpoint's are judged against other things).
PREFIX = {n: s.golden_prefix for n, s in REGISTRY.items() if s.golden_prefix}


def compute(factory: SessionFactory, case, stages=STAGES) -> dict[str, StageOutput]:
    """Run the requested stages: the read-only ones share one session, the others each start from a fresh
    load. Loading is never strict here: a load problem is the weight_mapping stage's finding, and the later
    stages still show what it does to the numbers."""
    results: dict[str, StageOutput] = {}
    shared: Session | None = None
    for i, name in enumerate(stages):
        stage = REGISTRY[name]
        if shared is not None and not any(REGISTRY[s].read_only for s in stages[i:]):  # one model in memory at a time
            shared = None
            release(case)
        try:
            if stage.read_only:
                if shared is None:
                    shared = factory.open(case, strict=False)
                results[name] = stage.compute(shared, case)
            elif stage.reopens:
                results[name] = stage.compute(factory.open(case, strict=False), case, factory)
            else:
                results[name] = stage.compute(factory.open(case, strict=False), case)
        except Unsupported as e:
            results[name] = StageOutput(unsupported=str(e))
        except Exception as e:  # reported as this stage's failure, with the message
            results[name] = StageOutput(error=f"{type(e).__name__}: {e}")
        if not stage.read_only:
            release(case)
    if shared is not None:
        shared = None
        release(case)
    return results


__all__ = [
    "ALL_STAGES",
    "ISOLATED_STAGES",
    "LAUNCHED_STAGES",
    "PREFIX",
    "REGISTRY",
    "STAGES",
    "Judged",
    "Session",
    "SessionFactory",
    "Stage",
    "StageOutput",
    "Unsupported",
    "compute",
    "release",
]
