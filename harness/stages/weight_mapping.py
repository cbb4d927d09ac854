"""weight_mapping: every parameter after loading, bit for bit against the checkpoint's own tensors, and the
load report: nothing missing, nothing extra."""

from __future__ import annotations

from ..compare import compare_group
from ..diagnosis.weight_mapping import weights
from .base import Judged, Session, Stage, StageOutput


def compute(s: Session, case) -> StageOutput:
    params = s.parameters()
    return StageOutput({f"weights.{k}": v for k, v in params.items()}, meta={"load_report": s.load_report()})


def judge(out: StageOutput, case, tol, run_to_run: bool) -> Judged:
    """Against the checkpoint (and the initial adapters), not goldens; the port's own load report counts too."""
    judged = Judged(compare_group(out.tensors, "weights.", case, "weights.", tol, expected=case.initial_weights))
    report = out.meta.get("load_report") or {}
    if not isinstance(report, dict):
        judged.message = f"the load report is not a JSON object: {str(report)[:200]}"
    else:
        problems = {k: report.get(k) for k in ("missing", "unexpected", "mismatched") if report.get(k)}
        if problems:
            judged.message = "; ".join(
                f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in problems.items()
            )
    return judged


STAGE = Stage("weight_mapping", "weights", compute, read_only=True, judge=judge, diagnose=weights)
