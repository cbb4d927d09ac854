"""Judge a backend's stage outputs against a case's goldens: one StageResult per stage, in order."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .backends import Backend, TrainerBackend
from .case import Case
from .compare import ABSENT, TensorResult, compare_group, forward_mask
from .diagnosis import Diagnosis, diagnose
from .diagnosis.codes import states_a_cause
from .diagnosis.weight_mapping import nondeterministic_load
from .false_alarm import largest, stage_false_alarm
from .findings import NOT_IMPLEMENTED, analyse
from .stages import ALL_STAGES, REGISTRY, StageOutput
from .tolerances import TruthBound, precision_tolerance, tolerance

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
    false_alarm: dict | None = None  # how likely a correct port fails it by chance (harness/false_alarm.py)

    def __post_init__(self):
        if self.diagnosis is not None and not self.diagnoses:
            self.diagnoses = [self.diagnosis]

    @property
    def margin(self) -> float:
        """The largest error / bound over the stage's judged tensors, each less what its conditioning explains
        (TensorResult.ratio; at most 1 passes)."""
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
            "false_alarm": self.false_alarm,
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

    def false_alarm(self) -> dict:
        """The chance that a port whose rounding is distributed like the reference's own fails this audit: at most
        the sum of its stages' (a union bound), over the stages estimated; the others are named."""
        estimated = {s.name: s.false_alarm for s in self.stages if s.false_alarm is not None}
        return {
            "probability": min(1.0, sum(f["probability"] for f in estimated.values())),
            "largest": max(estimated, key=lambda n: estimated[n]["probability"], default=None),
            "estimated": sorted(estimated),
            "not_estimated": [s.name for s in self.stages if s.false_alarm is None and s.tensors],
            # per stage, how likely the reference's noise reaches this backend's largest error (where it can say)
            "own": {n: f["own_probability"] for n, f in estimated.items() if f["own_probability"] is not None},
        }

    def to_dict(self) -> dict:
        found, inherited = self.findings()
        return {
            "fixture": self.fixture,
            "backend": self.backend,
            "verdict": self.verdict,
            "findings": [f.to_dict() for f in found],
            "false_alarm": self.false_alarm(),
            "inherited": [i.to_dict() for i in inherited],
            "stages": [s.to_dict() for s in self.stages],
        }


def judge(
    stage: str, out: StageOutput, case: Case, precision: str = "float32", run_to_run: bool = False
) -> StageResult:
    """`precision`: the float32 matmul mode the backend computed in (float32, or tf32 on a GPU that
    allows it); the truth bounds are scaled to it (harness/tolerances.py) and every stage's tolerance says so.
    `run_to_run`: the backend is one the harness runs on a nondeterministic device (the checkpoint stage's
    resume is then judged against its measured run-to-run spread)."""
    spec = REGISTRY[stage]
    tol = precision_tolerance(tolerance(spec.tolerance, case.settings.precision), precision)
    res = StageResult(stage, FAIL, tolerance=tol.describe())
    if spec.optional and not any(k.startswith(spec.golden_prefix) for k in case.golden):
        res.status, res.message = NOT_CHECKED, "this fixture has no goldens for the isolated check (regenerate it)"
        return res
    if out.error:
        res.message = out.error
        return res
    if out.unsupported:  # an optional request may go unchecked; a core stage may not
        res.status = NOT_CHECKED if spec.optional else FAIL
        res.message = f"{NOT_IMPLEMENTED}: {out.unsupported}"
        return res
    t = out.tensors
    losses = t.get(f"{stage}.loss")
    if spec.losses and isinstance(losses, np.ndarray) and losses.size < 10_000:
        res.series = {
            "port": [float(x) for x in np.ravel(losses)],
            "reference": [float(x) for x in case.golden["trajectory.loss"]],
        }
    if spec.judge is not None:
        judged = spec.judge(out, case, tol, run_to_run)
        res.tensors, res.message = judged.tensors, judged.message
        if judged.note:
            res.tolerance += f"; {judged.note}"
    else:
        prefix = spec.golden_prefix
        res.tensors = compare_group(t, prefix, case, prefix, tol, mask_for=forward_mask(case))
    res.false_alarm = _false_alarm(res.tensors, tol)
    declared = out.meta.get("not_computed") if spec.optional else None
    if declared:
        res.tensors, left = not_computed(res.tensors, declared)
        if left:
            res.tolerance += f"; not checked, the port cannot compute them: {left}"
        if not res.tensors:
            res.status, res.message = NOT_CHECKED, f"{NOT_IMPLEMENTED}: {left}"
            return res
    if not res.tensors and not res.message:
        res.message = "nothing to compare"
    res.status = PASS if res.tensors and not res.failures and not res.message else FAIL
    if res.status == FAIL and not res.message:
        res.message = res.worst().describe()
    return res


def _false_alarm(tensors: list[TensorResult], tol) -> dict | None:
    """The stage's false-alarm estimate from the held-out ratios its truth-judged tensors kept."""
    held = [t for t in tensors if t.heldout is not None]
    if not held or not isinstance(tol, TruthBound):
        return None
    top = largest(np.concatenate([t.heldout for t in held]))
    return stage_false_alarm(top, sum(t.total for t in held), tol.multiple, max(t.own_ratio for t in held))


def not_computed(tensors: list[TensorResult], declared: dict[str, str]) -> tuple[list[TensorResult], str]:
    """An optional request's outputs the port declared it cannot compute (`not_computed` in its stage metadata:
    a name, or its last part such as `scores` for every layer's, with the reason): those it left out are not
    checked, never passed; one it sent anyway is judged. Returns the judged tensors and what was left out."""

    def covers(key: str, name: str) -> bool:
        return name == key or name.endswith(f".{key}")

    dropped = [r for r in tensors if r.problem == ABSENT and any(covers(k, r.name) for k in declared)]
    kept = [r for r in tensors if r not in dropped]
    reasons = sorted({f"{k}: {why}" for k, why in declared.items() if any(covers(k, r.name) for r in dropped)})
    return kept, f"{len(dropped)} tensors ({'; '.join(reasons)})" if dropped else ""


def diagnose_stage(result: StageResult, out: StageOutput, case: Case) -> list[Diagnosis]:
    """Every distinct cause a failing stage shows, by the stage's own rule (at least a localisation)."""
    return diagnose(result, out, case, REGISTRY[result.name].diagnose)


def audit(backend: Backend, case: Case, stages=ALL_STAGES, precision: str = "float32") -> AuditResult:
    """`case` judged in `precision` must carry that precision's update sensitivities, measured when the case
    was prepared (harness/fixtures/truth.py `precision_case`), never here: the judge runs no twin."""
    if precision != getattr(case, "matmul_precision", "float32"):
        raise ValueError(
            f"a case judged in {precision} needs its sensitivities for it: "
            f"harness.fixtures.truth.precision_case(case, {precision!r})"
        )
    reason = backend.unavailable()
    if reason:
        return AuditResult(case.name, backend.name, [StageResult(s, SKIP, message=reason) for s in stages])
    # In process, one stage at a time: its outputs are judged and dropped before the next stage runs, so a real
    # model's weights are not held once per stage. Another process answers all the stages it was asked for.
    stream = isinstance(backend, TrainerBackend)
    source = getattr(case, "source", case)
    outputs = {} if stream else backend.run(source, stages)
    results = []
    port_weights: dict = {}  # the port's loaded weights: a forward failure is re-computed from them
    repeated: dict = {}  # the outputs of a check another repeats (the one update the N updates repeat): read by its rule
    repeats = {REGISTRY[s].repeats for s in stages if REGISTRY[s].repeats}
    for s in stages:
        out = (backend.run(source, [s]) if stream else outputs).get(s) or StageOutput(
            error=f"the backend returned nothing for stage {s}"
        )
        if s == "weight_mapping":
            port_weights = {k: v for k, v in out.tensors.items() if k.startswith("weights.")}
        if s in repeats:
            repeated = dict(out.tensors)
        try:
            r = judge(s, out, case, precision, run_to_run=bool(getattr(backend, "nondeterministic", False)))
        except Exception as e:  # a malformed output the checks above did not foresee: this stage's failure
            r = StageResult(s, FAIL, message=f"could not judge the backend's output: {type(e).__name__}: {e}")
        if r.status == FAIL:
            try:
                earlier = port_weights | (repeated if REGISTRY[s].repeats else {})
                seen = replace(out, tensors=earlier | out.tensors) if earlier else out
                r.diagnoses = diagnose_stage(r, seen, case)
                probe = REGISTRY[s].probe
                if probe and not out.error and not any(states_a_cause(d.code) for d in r.diagnoses):
                    r.diagnoses = [*probe(backend, source), *r.diagnoses]  # its own run on probe inputs
            except Exception as e:  # a rule that raises reports itself, never kills the audit
                r.diagnoses = [
                    Diagnosis("diagnosis_failed", f"the diagnosis rule for {s} raised {type(e).__name__}: {e}", {})
                ]
            if s == "weight_mapping" and port_weights and not stream:
                # another process's load of the same request: weights that differ were never the forward's
                again = backend.run(source, [s]).get(s)
                unseeded = nondeterministic_load(port_weights, again.tensors) if again and not again.error else None
                if unseeded:
                    r.diagnoses = [unseeded, *(d for d in r.diagnoses if d is not None)]
                    port_weights = {}
            r.diagnosis = r.diagnoses[0]
        results.append(r)
    return AuditResult(case.name, backend.name, results)
