"""checkpoint: run to k, save, resume in a fresh session, run to N. Judged against the trajectory's truth,
and against the backend's own uninterrupted run: bit for bit, or on a nondeterministic device within the
measured spread of two uninterrupted runs (harness/tolerances.py `run_to_run_bounds`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ..compare import TensorResult, compare, compare_group
from ..diagnosis.checkpoint import checkpoint
from ..tolerances import RESUME_SELF_CONSISTENCY, run_to_run_bounds
from .base import Judged, Session, SessionFactory, Stage, StageOutput, precision_of, release, run_updates, trainable

RESUMED = "(resumed vs own uninterrupted run)"  # the suffix of the tensors judged against the backend's own run


def compute(s: Session, case, factory: SessionFactory) -> StageOutput:
    """Run to `checkpoint_at`, save, resume in a fresh session, finish; also run uninterrupted (twice on a
    nondeterministic device: `checkpoint.repeat.*`, what the resume is judged against)."""
    k, n = case.settings.checkpoint_at, case.settings.steps
    initial = trainable(s)
    first = [s.step(case.batch)["total"] for _ in range(k)]
    precision = precision_of(s)
    with tempfile.TemporaryDirectory(prefix="parity-ckpt-") as tmp:
        s.save_checkpoint(Path(tmp) / "ckpt")
        del s  # one model in memory at a time: a real model's copies add up
        release(case)
        resumed = factory.resume(case, Path(tmp) / "ckpt")
        out = run_updates(resumed, case, n - k, initial, "checkpoint")
    del resumed
    release(case)
    out["checkpoint.loss"] = np.concatenate([np.asarray(first, dtype=precision), out["checkpoint.loss"]])
    fresh = factory.open(case, strict=False)
    out.update(run_updates(fresh, case, n, trainable(fresh), "checkpoint.uninterrupted"))
    if getattr(
        factory, "nondeterministic", False
    ):  # a GPU: the uninterrupted run again, its spread is the device's noise
        del fresh
        release(case)
        again = factory.open(case, strict=False)
        out.update(run_updates(again, case, n, trainable(again), "checkpoint.repeat"))
    return StageOutput(out)


def _resume_vs_repeat(t: dict, own: dict, repeat: dict, case) -> tuple[list[TensorResult], str]:
    """The resumed run against the same backend's uninterrupted one on a nondeterministic device: within
    a multiple of the spread between two uninterrupted runs (harness/tolerances.py), per tensor."""
    scales = {
        k: float(np.abs(case.initial_weights[w]).max())
        for k in own
        if k.startswith("checkpoint.delta.")
        and (w := "weights." + k.removeprefix("checkpoint.delta.")) in case.initial_weights
        and case.initial_weights[w].size
    }
    bounds = run_to_run_bounds(own, repeat, scales)
    truth = case.truth  # each element's conditioning: how far its update moves for a gradient error
    results = [
        compare(k, t.get(k), own[k], bounds[k], sensitivity=truth.get(k.replace("checkpoint.", "sens.trajectory.", 1)))
        for k in sorted(own)
        if k.startswith("checkpoint.delta.")
    ]
    results += [
        TensorResult(k, False, problem="not expected: the reference has no such tensor", tolerance="exact")
        for k in sorted(t)
        if k.startswith("checkpoint.delta.") and k not in own
    ]
    results.append(
        compare(
            "checkpoint.loss",
            t.get("checkpoint.loss"),
            own["checkpoint.loss"],
            bounds["checkpoint.loss"],
            sensitivity=truth.get("sens.trajectory.loss"),
        )
        if "checkpoint.loss" in own
        else TensorResult("checkpoint.loss", False, problem="no uninterrupted run to compare with")
    )
    spread = max((b.spread for b in bounds.values()), default=0.0)
    multiple = bounds[next(iter(bounds))].multiple if bounds else 0.0
    note = (
        f"resumed vs own uninterrupted run: within {multiple:g}× max(the run-to-run spread of two uninterrupted runs, "
        f"8 ulp of each tensor's scale) + each update's sensitivity (largest spread {spread:.3g}"
        + (": the two uninterrupted runs were bit-identical this time" if spread == 0 else "")
        + ")"
    )
    return results, note


def judge(out: StageOutput, case, tol, run_to_run: bool) -> Judged:
    """The resumed run against the trajectory's goldens and truth, then against the backend's own
    uninterrupted run. `run_to_run`: the backend is one the harness runs on a nondeterministic device, whose
    repeated uninterrupted run (`checkpoint.repeat.*`) sets the bound; from any other backend such tensors
    are unexpected (a port cannot loosen its own check)."""
    t = out.tensors
    judged = Judged(compare_group(t, "checkpoint.delta.", case, "trajectory.delta.", tol))
    judged.tensors += compare_group(t, "checkpoint.loss", case, "trajectory.loss", tol)
    own = {
        k.replace("checkpoint.uninterrupted.", "checkpoint."): v
        for k, v in t.items()
        if k.startswith("checkpoint.uninterrupted.")
    }
    repeat = {
        k.replace("checkpoint.repeat.", "checkpoint."): v for k, v in t.items() if k.startswith("checkpoint.repeat.")
    }
    if repeat and run_to_run:  # a nondeterministic device: judged against its measured run-to-run spread
        resumed, judged.note = _resume_vs_repeat(t, own, repeat, case)
    else:
        resumed = compare_group(
            t, "checkpoint.delta.", case, "checkpoint.delta.", RESUME_SELF_CONSISTENCY, expected=own
        )
        resumed.append(
            compare(
                "checkpoint.loss",
                t.get("checkpoint.loss"),
                own.get("checkpoint.loss", np.zeros(0)),
                RESUME_SELF_CONSISTENCY,
            )
            if "checkpoint.loss" in own
            else TensorResult("checkpoint.loss", False, problem="no uninterrupted run to compare with")
        )
    for r in resumed:
        r.name = f"{r.name} {RESUMED}"
    judged.tensors += resumed
    known = ("checkpoint.delta.", "checkpoint.uninterrupted.delta.") + (
        ("checkpoint.repeat.delta.",) if run_to_run else ()
    )
    judged.tensors += [
        TensorResult(
            k, False, problem="not expected: the checkpoint stage has no such tensor", tolerance=tol.describe()
        )
        for k in sorted(t)
        if not k.startswith(known)
        and k not in ("checkpoint.loss", "checkpoint.uninterrupted.loss")
        and not (run_to_run and k == "checkpoint.repeat.loss")
        and not k.startswith("checkpoint.loss")
    ]
    return judged


STAGE = Stage(
    "checkpoint",
    "ckpt",
    compute,
    reopens=True,
    consumes=("trajectory",),
    losses=True,
    judge=judge,
    diagnose=checkpoint,
)
