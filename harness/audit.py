"""Judge a backend's stage outputs against a case's goldens: one StageResult per stage, in order."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from reference.weights import IGNORED_KEYS

from .backends import Backend
from .case import Case
from .compare import TensorResult, compare
from .diagnosis import Diagnosis, diagnose
from .stages import STAGES, StageOutput
from .tolerances import RESUME_SELF_CONSISTENCY, Tolerance, tolerance

PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass
class StageResult:
    name: str
    status: str
    tensors: list[TensorResult] = field(default_factory=list)
    message: str = ""
    tolerance: str = ""
    diagnosis: "Diagnosis | None" = None
    series: dict = field(default_factory=dict)  # per-step losses, for the trajectory plot

    @property
    def failures(self) -> list[TensorResult]:
        return [t for t in self.tensors if not t.passed]

    def worst(self) -> TensorResult | None:
        """The failing tensor with the largest relative difference, or the first with a problem."""
        fails = self.failures
        if not fails:
            return None
        with_problem = [t for t in fails if t.problem]
        return with_problem[0] if with_problem else max(fails, key=lambda t: t.max_rel)

    def to_dict(self) -> dict:
        w = self.worst()
        return {
            "name": self.name,
            "status": self.status,
            "message": self.message,
            "tolerance": self.tolerance,
            "diagnosis": self.diagnosis.to_dict() if self.diagnosis else None,
            "series": self.series,
            "compared": len(self.tensors),
            "failed": len(self.failures),
            "worst": w.to_dict() if w else None,
            "tensors": [t.to_dict() for t in self.tensors],
        }


@dataclass
class AuditResult:
    fixture: str
    backend: str
    stages: list[StageResult]

    @property
    def verdict(self) -> str:
        if any(s.status == FAIL for s in self.stages):
            return FAIL
        return PASS if any(s.status == PASS for s in self.stages) else SKIP

    def first_failure(self) -> StageResult | None:
        return next((s for s in self.stages if s.status == FAIL), None)

    def to_dict(self) -> dict:
        return {"fixture": self.fixture, "backend": self.backend, "verdict": self.verdict, "stages": [s.to_dict() for s in self.stages]}


def _group(actual: dict, a_prefix: str, expected: dict, e_prefix: str, tol: Tolerance) -> list[TensorResult]:
    """Compare every expected `e_prefix*` tensor with `a_prefix*`; names the backend adds are failures too."""
    exp = {k[len(e_prefix):]: v for k, v in expected.items() if k.startswith(e_prefix)}
    act = {k[len(a_prefix):]: v for k, v in actual.items() if k.startswith(a_prefix)}
    results = [compare(a_prefix + k, act.get(k), e, tol) for k, e in sorted(exp.items())]
    for k in sorted(set(act) - set(exp)):
        results.append(TensorResult(a_prefix + k, False, problem="not expected: the reference has no such tensor", tolerance=tol.describe()))
    return results


def expected_weights(case: Case) -> dict[str, np.ndarray]:
    """What every parameter must hold after loading: the checkpoint tensors (and initial adapters)."""
    from reference.weights import checkpoint_files
    from safetensors.numpy import load_file

    tensors: dict[str, np.ndarray] = {}
    for f in checkpoint_files(case.checkpoint):
        tensors.update({k: v for k, v in load_file(str(f)).items() if not IGNORED_KEYS.search(k)})
    if case.lora_init is not None:
        tensors.update(load_file(str(case.lora_init)))
    return {f"weights.{k}": v for k, v in tensors.items()}


def judge(stage: str, out: StageOutput, case: Case) -> StageResult:
    tol = tolerance(stage)
    res = StageResult(stage, FAIL, tolerance=tol.describe())
    if out.error:
        res.message = out.error
        return res
    t, golden = out.tensors, case.golden
    if stage in ("trajectory", "checkpoint") and f"{stage}.loss" in t:
        res.series = {"port": [float(x) for x in np.ravel(t[f"{stage}.loss"])], "reference": [float(x) for x in golden["trajectory.loss"]]}
    if stage == "weight_mapping":
        res.tensors = _group(t, "weights.", expected_weights(case), "weights.", tol)
        report = out.meta.get("load_report") or {}
        problems = {k: report.get(k) for k in ("missing", "unexpected", "mismatched") if report.get(k)}
        if problems:
            res.message = "; ".join(f"{k}: {', '.join(v)}" for k, v in problems.items())
    elif stage == "checkpoint":
        res.tensors = _group(t, "checkpoint.delta.", golden, "trajectory.delta.", tol)
        res.tensors.append(compare("checkpoint.loss", t.get("checkpoint.loss"), golden["trajectory.loss"], tol))
        own = {k.replace("checkpoint.uninterrupted.", "checkpoint."): v for k, v in t.items() if k.startswith("checkpoint.uninterrupted.")}
        resumed = _group(t, "checkpoint.delta.", own, "checkpoint.delta.", RESUME_SELF_CONSISTENCY)
        resumed.append(compare("checkpoint.loss", t.get("checkpoint.loss"), own.get("checkpoint.loss"), RESUME_SELF_CONSISTENCY))
        for r in resumed:
            r.name = f"{r.name} (resumed vs own uninterrupted run)"
        res.tensors += resumed
    else:
        prefix = {"forward": "forward.", "shifted_slices": "shifted.", "loss": "loss.", "gradients": "grad.",
                  "optimizer": "optimizer.", "trajectory": "trajectory."}[stage]
        res.tensors = _group(t, prefix, golden, prefix, tol)
        if stage == "optimizer":  # the step counter is an integer: exact
            for r in res.tensors:
                if r.name == "optimizer.step":
                    r.__dict__.update(compare("optimizer.step", t.get("optimizer.step"), golden["optimizer.step"], RESUME_SELF_CONSISTENCY).__dict__)
    if not res.tensors and not res.message:
        res.message = "nothing to compare"
    res.status = PASS if res.tensors and not res.failures and not res.message else FAIL
    if res.status == FAIL and not res.message:
        res.message = res.worst().describe()
    return res


def audit(backend: Backend, case: Case, stages=STAGES) -> AuditResult:
    reason = backend.unavailable()
    if reason:
        return AuditResult(case.name, backend.name, [StageResult(s, SKIP, message=reason) for s in stages])
    outputs = backend.run(case, stages)
    results = []
    for s in stages:
        r = judge(s, outputs[s], case)
        if r.status == FAIL:
            r.diagnosis = diagnose(r, outputs[s], case)
        results.append(r)
    return AuditResult(case.name, backend.name, results)
