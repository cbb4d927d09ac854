"""Judge a backend's stage outputs against a case's goldens: one StageResult per stage, in order."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mlx_parity.reference.precision import parameter_dtype

from . import pieces
from .backends import Backend, TrainerBackend
from .case import Case
from .compare import TensorResult, compare
from .diagnosis import Diagnosis, diagnose
from .findings import analyse
from .stages import ALL_STAGES, ISOLATED_STAGES, PREFIX, StageOutput
from .tolerances import EXACT, RESUME_SELF_CONSISTENCY, Tolerance, TruthBound, stage_rms, tolerance
from .truth import needs_truth

PASS, FAIL, SKIP, NOT_CHECKED = "pass", "fail", "skip", "not checked"


@dataclass
class StageResult:
    name: str
    status: str
    tensors: list[TensorResult] = field(default_factory=list)
    message: str = ""
    tolerance: str = ""
    diagnosis: Diagnosis | None = None  # the first of `diagnoses`
    diagnoses: list = field(default_factory=list)  # every distinct cause the stage's failure shows
    series: dict = field(default_factory=dict)  # per-step losses, for the trajectory plot

    def __post_init__(self):
        if self.diagnosis is not None and not self.diagnoses:
            self.diagnoses = [self.diagnosis]

    @property
    def margin(self) -> float:
        """The largest error / bound over the stage's judged tensors (at most 1 passes)."""
        finite = [t.ratio for t in self.tensors if not t.problem]
        return max(finite, default=0.0)

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
            "margin": self.margin,
            "diagnosis": self.diagnosis.to_dict() if self.diagnosis else None,
            "diagnoses": [d.to_dict() for d in self.diagnoses],
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

    def findings(self):
        """(distinct findings, inherited failures): harness/findings.py."""
        return analyse(self.stages)

    def to_dict(self) -> dict:
        found, inherited = self.findings()
        return {
            "fixture": self.fixture,
            "backend": self.backend,
            "verdict": self.verdict,
            "findings": [f.to_dict() for f in found],
            "inherited": [i.to_dict() for i in inherited],
            "stages": [s.to_dict() for s in self.stages],
        }


def _group(
    actual: dict,
    a_prefix: str,
    case: Case,
    e_prefix: str,
    tol: Tolerance,
    expected: dict | None = None,
    mask_for=lambda name: True,
) -> list[TensorResult]:
    """Compare every expected `e_prefix*` tensor with `a_prefix*`; names the backend adds are failures too.
    Expected values are the case's goldens (judged against its truth) unless `expected` is given."""
    golden, truth = (case.golden, case.truth) if expected is None else (expected, {})
    exp = {k[len(e_prefix) :]: v for k, v in golden.items() if k.startswith(e_prefix)}
    act = {k[len(a_prefix) :]: v for k, v in actual.items() if k.startswith(a_prefix)}
    judged = [k for k in exp if f"truth.{e_prefix}{k}" in truth]
    rms = stage_rms((golden[e_prefix + k], truth[f"truth.{e_prefix}{k}"], mask_for(e_prefix + k)) for k in judged)
    # The forward's pieces: one kind (every layer's `output`, every layer's `q`) is one computation, and a
    # whole layer rounds far more than one softmax: each kind's noise is at least its own rms over the layers.
    # In bfloat16 the other stages' floor is taken per role (every Δθ, every m, the losses): one bfloat16 loss
    # error would otherwise floor every float32 adapter's update.
    by_role = e_prefix != pieces.PREFIX and case.settings.precision != "float32"
    kind = (
        pieces.piece_of if e_prefix == pieces.PREFIX else (lambda k: k.split(".", 1)[0]) if by_role else (lambda k: "")
    )
    kind_rms = {
        g: max(
            0.0 if by_role else rms,
            stage_rms(
                (
                    golden[e_prefix + k],
                    truth[f"truth.{e_prefix}{k}"],
                    mask_for(e_prefix + k),
                    truth.get(f"sens.{e_prefix}{k}"),
                )
                for k in judged
                if kind(k) == g
            ),
        )
        for g in {kind(k) for k in judged}
    }
    params = case.initial_weights if truth and any(".delta." in e_prefix + k for k in exp) else {}
    # Δθ over N updates carries the rounding of θ at every update (decay, then the step)
    updates = case.settings.steps if e_prefix.startswith(("trajectory.", "isolated.schedule.")) else 1
    results = []
    for k, e in sorted(exp.items()):
        full = e_prefix + k
        exact = not isinstance(tol, TruthBound) or not needs_truth(full, e)
        if exact:
            results.append(
                compare(a_prefix + k, act.get(k), e, EXACT if isinstance(tol, TruthBound) else tol, mask=mask_for(full))
            )
        else:
            t = truth[f"truth.{full}"]
            pname = full.split(".delta.", 1)[-1]
            theta = params.get("weights." + pname) if ".delta." in full else None
            if theta is not None:  # θ before and after: the larger sets the precision Δθ can have
                theta = updates * np.maximum(np.abs(theta), np.abs(theta + t))
            results.append(
                compare(
                    a_prefix + k,
                    act.get(k),
                    e,
                    tol,
                    truth=t,
                    sensitivity=truth.get(f"sens.{full}"),
                    stage_rms=kind_rms.get(kind(k), rms),
                    mask=mask_for(full),
                    param=theta,
                    param_dtype=parameter_dtype(pname, case.settings.precision),
                )
            )
    for k in sorted(set(act) - set(exp)):
        results.append(
            TensorResult(
                a_prefix + k, False, problem="not expected: the reference has no such tensor", tolerance=tol.describe()
            )
        )
    return results


def forward_mask(case: Case):
    """Forward outputs are judged at real tokens only: what a port computes at padded positions never
    reaches the loss (HF-style attention masking changes it and trains identically)."""
    attention = case.batch["attention_mask"]
    mask = attention.astype(bool)[..., None]

    def where(name: str):
        if name.startswith(pieces.PREFIX):
            return pieces.real_tokens(name, attention)
        return mask if name.startswith("forward.") else True

    return where


def _resume_vs_repeat(t: dict, own: dict, repeat: dict, case: Case) -> tuple[list[TensorResult], str]:
    """The resumed run against the same backend's uninterrupted one on a nondeterministic device: within
    a multiple of the spread between two uninterrupted runs (harness/device.py), per tensor."""
    from .device import run_to_run_bounds

    scales = {
        k: float(np.abs(case.initial_weights[w]).max())
        for k in own
        if k.startswith("checkpoint.delta.")
        and (w := "weights." + k.removeprefix("checkpoint.delta.")) in case.initial_weights
        and case.initial_weights[w].size
    }
    bounds = run_to_run_bounds(own, repeat, scales)
    truth = case.truth  # each element's conditioning: how far its update moves for a gradient error (harness/truth.py)
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


def judge(
    stage: str, out: StageOutput, case: Case, precision: str = "float32", run_to_run: bool = False
) -> StageResult:
    """`precision`: the float32 matmul mode the backend computed in (float32, or tf32 on a GPU that
    allows it); the truth bounds are scaled to it (harness/device.py) and every stage's tolerance says so.
    `run_to_run`: the backend is one the harness runs on a nondeterministic device, whose repeated
    uninterrupted run (`checkpoint.repeat.*`) sets the resume check's bound; from any other backend
    such tensors are unexpected (a port cannot loosen its own check)."""
    from .device import precision_tolerance

    tol = precision_tolerance(tolerance(stage, case.settings.precision), precision)
    res = StageResult(stage, FAIL, tolerance=tol.describe())
    if stage in ISOLATED_STAGES and not any(
        k.startswith(f"isolated.{stage.removeprefix('isolated_')}.") for k in case.golden
    ):
        res.status, res.message = NOT_CHECKED, "this fixture has no goldens for the isolated check (regenerate it)"
        return res
    if out.error:
        res.message = out.error
        return res
    if out.unsupported:  # an optional request may go unchecked; a core stage may not
        res.status = NOT_CHECKED if stage in ISOLATED_STAGES else FAIL
        res.message = f"not implemented by the backend: {out.unsupported}"
        return res
    t, golden = out.tensors, case.golden
    if (
        stage in ("trajectory", "checkpoint")
        and isinstance(t.get(f"{stage}.loss"), np.ndarray)
        and t[f"{stage}.loss"].size < 10_000
    ):
        res.series = {
            "port": [float(x) for x in np.ravel(t[f"{stage}.loss"])],
            "reference": [float(x) for x in golden["trajectory.loss"]],
        }
    if stage == "weight_mapping":
        res.tensors = _group(t, "weights.", case, "weights.", tol, expected=case.initial_weights)
        report = out.meta.get("load_report") or {}
        if not isinstance(report, dict):
            res.message = f"the load report is not a JSON object: {str(report)[:200]}"
        else:
            problems = {k: report.get(k) for k in ("missing", "unexpected", "mismatched") if report.get(k)}
            if problems:
                res.message = "; ".join(
                    f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in problems.items()
                )
    elif stage == "checkpoint":
        res.tensors = _group(t, "checkpoint.delta.", case, "trajectory.delta.", tol)
        res.tensors += _group(t, "checkpoint.loss", case, "trajectory.loss", tol)
        own = {
            k.replace("checkpoint.uninterrupted.", "checkpoint."): v
            for k, v in t.items()
            if k.startswith("checkpoint.uninterrupted.")
        }
        repeat = {
            k.replace("checkpoint.repeat.", "checkpoint."): v
            for k, v in t.items()
            if k.startswith("checkpoint.repeat.")
        }
        if repeat and run_to_run:  # a nondeterministic device: judged against its measured run-to-run spread
            resumed, note = _resume_vs_repeat(t, own, repeat, case)
            res.tolerance += f"; {note}"
        else:
            resumed = _group(t, "checkpoint.delta.", case, "checkpoint.delta.", RESUME_SELF_CONSISTENCY, expected=own)
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
            r.name = f"{r.name} (resumed vs own uninterrupted run)"
        res.tensors += resumed
        known = ("checkpoint.delta.", "checkpoint.uninterrupted.delta.") + (
            ("checkpoint.repeat.delta.",) if run_to_run else ()
        )
        res.tensors += [
            TensorResult(
                k, False, problem="not expected: the checkpoint stage has no such tensor", tolerance=tol.describe()
            )
            for k in sorted(t)
            if not k.startswith(known)
            and k not in ("checkpoint.loss", "checkpoint.uninterrupted.loss")
            and not (run_to_run and k == "checkpoint.repeat.loss")
            and not k.startswith("checkpoint.loss")
        ]
    else:
        prefix = PREFIX[stage]
        res.tensors = _group(t, prefix, case, prefix, tol, mask_for=forward_mask(case))
    if not res.tensors and not res.message:
        res.message = "nothing to compare"
    res.status = PASS if res.tensors and not res.failures and not res.message else FAIL
    if res.status == FAIL and not res.message:
        res.message = res.worst().describe()
    return res


def audit(backend: Backend, case: Case, stages=ALL_STAGES, precision: str = "float32") -> AuditResult:
    reason = backend.unavailable()
    if reason:
        return AuditResult(case.name, backend.name, [StageResult(s, SKIP, message=reason) for s in stages])
    # In process, one stage at a time: its outputs are judged and dropped before the next stage runs, so a real
    # model's weights are not held once per stage. Another process answers all the stages it was asked for.
    stream = isinstance(backend, TrainerBackend)
    source = case
    outputs = {} if stream else backend.run(case, stages)
    if precision != "float32":  # the updates' sensitivity to that precision's gradient error (harness/device.py)
        from .device import precision_case

        case = precision_case(case, precision)
    results = []
    for s in stages:
        out = (backend.run(source, [s]) if stream else outputs).get(s) or StageOutput(
            error=f"the backend returned nothing for stage {s}"
        )
        try:
            r = judge(s, out, case, precision, run_to_run=bool(getattr(backend, "nondeterministic", False)))
        except Exception as e:  # a malformed output the checks above did not foresee: this stage's failure
            r = StageResult(s, FAIL, message=f"could not judge the backend's output: {type(e).__name__}: {e}")
        if r.status == FAIL:
            try:
                r.diagnoses = diagnose(r, out, case)
            except Exception as e:  # a rule that raises reports itself, never kills the audit
                r.diagnoses = [
                    Diagnosis("diagnosis_failed", f"the diagnosis rule for {s} raised {type(e).__name__}: {e}", {})
                ]
            r.diagnosis = r.diagnoses[0]
        results.append(r)
    return AuditResult(case.name, backend.name, results)
